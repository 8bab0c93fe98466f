"""The bench's optional peer column: mamba_ssm's own CUDA-graph decode step on our weights.

The peer is mamba_ssm's MambaLMHeadModel holding our model's parameter tensors (built on the meta
device, then `load_state_dict(assign=True)`), so it costs no weight memory. It is timed through
`mamba_ssm.utils.generation.update_graph_cache`, the captured step `generate(cg=True)` replays.
"""

from __future__ import annotations

import gc
import logging
import time

import torch
from torch import nn

from avengers.decode.options import DecodeOptions
from avengers.inference.check import DecodeMismatch, _rel

log = logging.getLogger(__name__)

PEER_MODES = ("auto", "mamba_ssm", "off")


def import_error() -> str | None:
    """Why mamba_ssm's model and graph decode do not import; None when they do."""
    try:
        import mamba_ssm.models.mixer_seq_simple  # noqa: F401
        import mamba_ssm.utils.generation  # noqa: F401
    except Exception as e:  # a broken install can fail with more than ImportError (e.g. OSError)
        return f"{type(e).__name__}: {e}"
    return None


def build_peer(model: nn.Module) -> nn.Module:
    """mamba_ssm's MambaLMHeadModel holding `model`'s own Parameter objects (no copy; a later
    model.to(dtype) casts both), in eval mode."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d = model.config.to_mamba_ssm()
    d["ssm_cfg"] = {**d["ssm_cfg"], "use_mem_eff_path": False}  # needs causal-conv1d; decode does not use it
    cfg = MambaConfig(**d)
    state = model.state_dict(keep_vars=True)
    param = next(model.parameters())
    try:
        peer = MambaLMHeadModel(cfg, device="meta")
        peer.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*peer.parameters(), *peer.buffers()]):  # a buffer outside the state dict
            raise RuntimeError("tensors left on the meta device")
    except (RuntimeError, NotImplementedError) as e:
        log.warning("mamba_ssm model on the meta device failed (%s); building it on %s", e, param.device)
        peer = MambaLMHeadModel(cfg, device=param.device, dtype=param.dtype)
        peer.load_state_dict(state, strict=True, assign=True)
    peer.tie_weights()
    return peer.eval()


def _free(graph) -> None:
    """Drop a DecodingCGCache's graphs and inference cache (its `run` closure keeps a cycle)."""
    graph.callables.clear()
    graph.run = graph.inference_params = graph.mempool = None
    gc.collect()
    torch.cuda.empty_cache()


def _graph(peer: nn.Module, batch: int, start: int, max_seqlen: int):
    from mamba_ssm.utils.generation import update_graph_cache

    return update_graph_cache(peer, None, batch, start, max_seqlen)


@torch.no_grad()
def check_peer(
    model: nn.Module,
    peer: nn.Module,
    vocab: int,
    tol: float,
    steps: int = 32,
    seed: int = 3,
    options: DecodeOptions | None = None,
) -> float:
    """Batch-1 logits of our cached decode vs mamba_ssm's graph step, both from an empty state, on
    the same `steps` tokens; returns the max relative error, raises DecodeMismatch above tol."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, steps), generator=g).to(param.device)
    cache = model.allocate_cache(1, steps, param.device, param.dtype, options)
    ours = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(steps)], 1)
    with torch.inference_mode():  # the graph's inputs are inference tensors
        graph = _graph(peer, 1, 0, steps)
        try:
            for v in graph.inference_params.key_value_memory_dict.values():  # capture warm-ups wrote states
                for t in v if isinstance(v, tuple) else (v,):
                    t.zero_()
            pos = torch.zeros(1, 1, dtype=torch.long, device=param.device)
            theirs = torch.cat([graph.run(ids[:, i : i + 1], pos.fill_(i), i) for i in range(steps)], 1)
        finally:
            _free(graph)
    err = _rel(theirs, ours)
    if not err <= tol:
        raise DecodeMismatch(
            f"mamba_ssm's graph decode differs from ours on the same weights in {param.dtype}: max relative "
            f"error {err:.3g} > tol {tol:.3g} over {steps} batch-1 steps"
        )
    return err


@torch.inference_mode()
def time_peer(
    peer: nn.Module, batch: int, start: int, max_seqlen: int, vocab: int, warmup: int, rounds: int, steps: int
) -> list[float]:
    """Seconds per mamba_ssm graph step at positions start.., one figure per round of `steps` steps
    (warm-up excluded), as bench.time_decode times ours; the peer's cache is freed afterwards."""
    device = next(peer.parameters()).device
    graph = _graph(peer, batch, start, max_seqlen)
    try:
        tokens = torch.randint(0, vocab, (batch, 1), device=device)
        pos = torch.full((batch, 1), start, dtype=torch.long, device=device)
        for i in range(warmup):
            graph.run(tokens, pos, start + i)
        out = []
        for _ in range(rounds):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for i in range(steps):
                graph.run(tokens, pos, start + i)
            torch.cuda.synchronize(device)
            out.append((time.perf_counter() - t0) / steps)
        return out
    finally:
        _free(graph)
