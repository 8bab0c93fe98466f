"""Correctness checks the benchmark runs before timing anything: cached decode == full forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from avengers.decode.options import DecodeOptions
from avengers.inference.graphs import DecodeStep


class DecodeMismatch(AssertionError):
    """Cached/graph decode disagrees with the reference computation."""


@dataclass
class CheckResult:
    max_rel_err: float  # one-shot prefill + decode vs full forward, max |diff| / max |full|
    chunked_prefill: bool  # whether a two-chunk prefill also matches (else the bench prefills in one call)
    chunked_note: str = ""
    graph_rel_err: float | None = None  # graph replay vs eager decode, in the bench dtype
    dtype_rel_err: float | None = None  # batch-1 prefill + decode vs full forward in the bench dtype (below fp32)
    dtype_tol: float | None = None  # its tolerance (check_timed_dtype)
    decode_mode: str = "eager"  # how the bench times decode: "cuda_graph" once the graph check passed
    notes: list[str] = field(default_factory=list)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@torch.no_grad()
def _cached_logits(
    model: nn.Module, ids: torch.Tensor, prefill_splits: list[int], options: DecodeOptions | None = None
) -> torch.Tensor:
    B, L = ids.shape
    cache = model.allocate_cache(B, L, ids.device, next(model.parameters()).dtype, options)
    out, pos = [], 0
    for n in prefill_splits:
        out.append(model(ids[:, pos : pos + n], cache=cache))
        pos += n
    for i in range(pos, L):
        out.append(model(ids[:, i : i + 1], cache=cache))
    if cache.seq_len != L or int(cache.position) != L:
        raise DecodeMismatch(f"cache position {cache.seq_len} (device {int(cache.position)}) after {L} tokens")
    return torch.cat(out, dim=1)


@torch.no_grad()
def check_cached_decode(
    model: nn.Module,
    vocab_size: int,
    device: torch.device,
    length: int = 48,
    prefill: int = 32,
    batch: int = 2,
    tol: float = 1e-4,
    seed: int = 0,
    options: DecodeOptions | None = None,
) -> CheckResult:
    """Full forward vs one-shot prefill + decode (must match within tol, relative to max |logit|),
    at `batch` and at batch 1 (some decode paths serve batch 1 only), then vs a two-chunk prefill +
    decode (sets `chunked_prefill`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=g).to(device)
    full = model(ids)
    err = _rel(_cached_logits(model, ids, [prefill], options), full)
    if batch > 1:
        err = max(err, _rel(_cached_logits(model, ids[:1], [prefill], options), full[:1]))
    if not err <= tol:
        raise DecodeMismatch(f"cached decode differs from the full forward: max relative error {err:.3g} > tol {tol:g}")
    result = CheckResult(max_rel_err=err, chunked_prefill=True)
    try:
        err2 = _rel(_cached_logits(model, ids, [prefill // 2, prefill - prefill // 2], options), full)
        if not err2 <= tol:
            result.chunked_prefill, result.chunked_note = False, f"two-chunk prefill error {err2:.3g} > tol {tol:g}"
    except (NotImplementedError, ValueError, RuntimeError) as e:
        result.chunked_prefill, result.chunked_note = False, f"two-chunk prefill raised {type(e).__name__}: {e}"
    return result


@torch.no_grad()
def check_graph_decode(
    model: nn.Module,
    vocab_size: int,
    device: torch.device,
    length: int = 48,
    prefill: int = 32,
    batch: int = 2,
    tol: float = 2e-2,
    seed: int = 1,
    options: DecodeOptions | None = None,
) -> float:
    """CUDA-graph replay vs eager decode on the same tokens; returns the max relative error."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=g).to(device)
    dtype = next(model.parameters()).dtype
    runs = []
    for use_graph in (False, True):
        cache = model.allocate_cache(batch, length, device, dtype, options)
        model(ids[:, :prefill], cache=cache)
        step = DecodeStep(model, cache, cuda_graph=use_graph)
        runs.append(torch.stack([step(ids[:, i : i + 1]).clone() for i in range(prefill, length)], 1))
    err = _rel(runs[1], runs[0])
    if not err <= tol:
        raise DecodeMismatch(
            f"CUDA-graph decode differs from eager decode: max relative error {err:.3g} > tol {tol:g} "
            "(does the model read its decode position from cache.position?)"
        )
    return err


@torch.no_grad()
def timed_dtype_case(
    model: nn.Module, vocab_size: int, device: torch.device, length: int = 48, seed: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-1 case for check_timed_dtype: ids [1, length] and their full forward with the model's
    current (fp32) weights, taken before the model is cast to the timed dtype."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, length), generator=g).to(device)
    return ids, model(ids)


@torch.no_grad()
def check_timed_dtype(
    model: nn.Module,
    ids: torch.Tensor,
    fp32_logits: torch.Tensor,
    prefill: int = 32,
    factor: float = 3.0,
    min_tol: float = 0.02,
    options: DecodeOptions | None = None,
) -> tuple[float, float]:
    """Batch-1 prefill + decode vs the full forward in the model's own dtype (the one the bench
    times), for decode paths that serve only low precision and so miss the fp32 check (e.g.
    the gluon path, bf16 only). The tolerance scales with the dtype's own rounding: `factor`
    x the full forward's error against fp32_logits (timed_dtype_case, same weights before the
    cast), at least min_tol. Measured on the CPU in bf16: decode errors equal that rounding error
    (llama3_1.8b 3.3%, tele128_llama3_1.8b 5.0%, tiny models ~0.8%); Llama decoding without RoPE
    145%. Returns (error, tolerance)."""
    full = model(ids)
    tol = max(min_tol, factor * _rel(full, fp32_logits))
    err = _rel(_cached_logits(model, ids, [prefill], options), full)
    if not err <= tol:
        raise DecodeMismatch(
            f"batch-1 decode in {next(model.parameters()).dtype} differs from the full forward: "
            f"max relative error {err:.3g} > tol {tol:.3g} ({factor:g} x the dtype's own rounding "
            f"error against fp32)"
        )
    return err, tol
