"""Where the Triton kernel tests run: CUDA, or Triton's CPU interpreter (`make test-triton`)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch


def triton_device() -> str:
    """'cuda' or 'cpu' (interpreter); skips the calling test module when neither can run Triton.

    Call at module level, before importing the kernels (they import triton)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 for Triton's CPU interpreter", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def few_gemv_tiles(device: str, *kernels):
    """On CUDA the GEMV autotuners would compile and time all 27 tiles for every new shape (minutes
    per test file); correctness needs a few of the kinds the H200 picks (batch 8 keeps only the last).
    The interpreter has one tile already."""
    saved = [k.configs for k in kernels]
    if device == "cuda":
        import triton

        tiles = [
            triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk, w in ((2, 2048, 8), (8, 512, 2), (2, 1024, 4))
        ]
        for k in kernels:
            k.configs = tiles
    try:
        yield
    finally:
        for k, configs in zip(kernels, saved):
            k.configs = configs


@torch.no_grad()
def assert_decode_path_matches_full_forward(model, spec, path: str, device: str, batch: int = 2) -> None:
    """Prefill 16 tokens, then decode 4 one at a time on the decode `path`: the logits equal one
    full forward over all 20."""
    from decode_helpers import decode_logits

    ids = torch.randint(0, spec.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(2)).to(device)
    torch.testing.assert_close(decode_logits(model, ids, 16, path), model(ids), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def assert_graph_decode_matches_eager(model, spec, path: str, device: str) -> None:
    """8 decode steps on the decode `path` replayed from a CUDA graph give the per-module eager
    path's logits (the kernels keep their order inside the graph)."""
    from avengers.decode.options import DecodeOptions
    from avengers.inference.graphs import DecodeStep

    ids = torch.randint(0, spec.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3)).to(device)
    eager_cache = model.allocate_cache(1, 24, options=DecodeOptions("reference"))
    model(ids[:, :16], cache=eager_cache)
    eager = [model(ids[:, i : i + 1], cache=eager_cache) for i in range(16, 24)]
    cache = model.allocate_cache(1, 24, options=DecodeOptions(path))
    model(ids[:, :16], cache=cache)
    step = DecodeStep(model, cache, cuda_graph=True)
    replayed = [step(ids[:, i : i + 1]).clone() for i in range(16, 24)]
    torch.testing.assert_close(torch.stack(replayed).squeeze(), torch.cat(eager, 1).squeeze(), atol=2e-4, rtol=2e-4)
