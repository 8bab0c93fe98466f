"""Decode-path test helpers shared by the model families' tests."""

from __future__ import annotations

import torch


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor, prefill: int, path: str = "reference", dtype=None) -> torch.Tensor:
    """Prefill ids[:, :prefill] into a fresh cache (of `dtype`, default the model's) whose steps take
    the decode `path`, then decode the rest one token at a time: every call's logits concatenated
    along time, [B, T, V], comparable with one full forward over ids."""
    from avengers.decode.options import DecodeOptions

    B, T = ids.shape
    cache = model.allocate_cache(B, T, dtype=dtype, options=DecodeOptions(path))
    return torch.cat(
        [model(ids[:, :prefill], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(prefill, T)],
        1,
    )


def track_compiled(monkeypatch, module, name: str):
    """Count calls of the torch.compile'd function module.<name>() returns (cached) from here on:
    returns the list of calls and a function giving the number of graphs dynamo has built since
    (its caches cleared first, so that earlier tests' graphs do not count)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = getattr(module, name)()
    before = counters["stats"]["unique_graphs"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(module, name, lambda: counted)
    return calls, lambda: counters["stats"]["unique_graphs"] - before
