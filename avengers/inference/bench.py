"""`python -m avengers.bench`: prefill time, decode tokens/s, cache bytes and largest batch vs context.

For every variant: build it with random weights, run the correctness checks (check.py), then for
every context length L:
  1. real prefill of L - room tokens at batch 1 (timed; `room` leaves space for the decode steps),
  2. cache bytes per sequence from the allocated tensors (InferenceCache.nbytes, cache sized to L),
  3. for every batch size (and the largest that fits): copy the batch-1 state into every row
     (`InferenceCache.broadcast_from`, so large batches need no large prefill), capture the decode
     step in a CUDA graph (eager on CPU), warm up, and time `steps` decode steps.
  4. with --peer (Mamba family on CUDA): mamba_ssm's own graph decode at the listed batch sizes (peer.py).
  5. with --profile: `steps` eager steps through the torch profiler, time per kernel (profile.py).
Decode steps run at positions L - room .. L - 1 of a cache sized to L: attention reads keys
written by the real prefill; the few positions between the prefill and the step are masked.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from avengers.decode.cache import InferenceCache
from avengers.decode.options import ATTENTION_BACKENDS, DECODE_PATHS, SSM_STATE_DTYPES, DecodeOptions
from avengers.dtypes import DTYPES
from avengers.hardware import device_spec, measure_copy_bandwidth, synchronize
from avengers.inference import peer as peer_mod
from avengers.inference.bench_report import TARGET_CONTEXT, merge_reports, targets_summary, write_report
from avengers.inference.check import (
    CheckResult,
    DecodeMismatch,
    check_cached_decode,
    check_graph_decode,
    check_timed_dtype,
    timed_dtype_case,
)
from avengers.inference.graphs import DecodeStep
from avengers.inference.profile import profile_steps
from avengers.models.registry import get_model_spec, list_variants

log = logging.getLogger(__name__)

GPU_DEFAULT_VARIANTS = ("llama3_1.8b", "mamba2_1.3b", "mamba_1.5b", "tele128_llama3_1.8b")


@dataclass
class BenchConfig:
    variants: list[str]
    contexts: list[int]
    batch_sizes: list[int]
    device: str
    dtype: str = "bf16"
    steps: int = 20  # timed decode steps per round
    rounds: int = 5  # timed rounds per measurement: the median is reported, with the spread
    warmup: int = 3
    find_max_batch: bool = True
    max_batch_cap: int = 4096
    memory_fraction: float = 0.9  # of the free GPU memory the largest batch may use
    bandwidth_gbs: float | None = None  # None: the device's own (avengers.hardware), no roofline on CPU
    peak_tflops: float | None = None  # None: the device's dense bf16 peak (avengers.hardware)
    prefill_chunk: int = 0  # >0: prefill in chunks of this many tokens (families whose chunked prefill checks out)
    cuda_graph: bool = True
    deadline_s: float = 450.0  # stop starting new measurements after this many seconds
    out: str = "bench_out"
    seed: int = 0
    check_tol: float | None = None  # None: 1e-4 on CPU, 1e-2 on CUDA (TF32 in Triton kernels)
    decode: str = "auto"  # decode path (avengers.decode.options.DECODE_PATHS); auto: the fastest per family
    decode_attn: str = "auto"  # attention decode kernel: auto | triton | torch
    ssm_state: str = "fp32"  # Mamba-2 SSM state dtype (DecodeOptions.ssm_state): fp32 | model
    peer: str = "auto"  # mamba_ssm's graph decode beside ours (peer.PEER_MODES); auto: on CUDA when it imports
    profile: bool = False  # per row, also profile `steps` eager steps: time per kernel (profile.py)

    @property
    def options(self) -> DecodeOptions:
        return DecodeOptions(path=self.decode, attention=self.decode_attn, ssm_state=self.ssm_state)

    def validate(self) -> None:
        known = list_variants()
        bad = [v for v in self.variants if v not in known]
        if bad:
            raise ValueError(f"unknown variants {bad}; known: {', '.join(known)}")
        if not self.variants:
            raise ValueError("no variants to benchmark")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if any(c < self.room + 2 for c in self.contexts):
            raise ValueError(f"every context must be >= {self.room + 2} (steps + warm-up room), got {self.contexts}")
        if any(b < 1 for b in self.batch_sizes) or self.steps < 1 or self.rounds < 1 or self.warmup < 0:
            raise ValueError(
                f"batch sizes, steps and rounds must be >= 1, got {self.batch_sizes}, steps={self.steps}, "
                f"rounds={self.rounds}"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.peer not in peer_mod.PEER_MODES:
            raise ValueError(f"peer must be one of {peer_mod.PEER_MODES}, got {self.peer!r}")
        if self.peer == "mamba_ssm":
            if torch.device(self.device).type != "cuda":
                raise ValueError(f"--peer mamba_ssm needs a CUDA device (its graph decode), got {self.device!r}")
            reason = peer_mod.import_error()
            if reason:
                raise ValueError(f"--peer mamba_ssm: mamba_ssm does not import ({reason})")
        self.options.resolve("llama", self.device)  # a path this device cannot run fails here, before any model

    @property
    def room(self) -> int:
        """Positions kept free at the end of the cache for the decode steps."""
        return max(self.steps, self.warmup) + 1


def parse_size(text: str) -> int:
    """'4k' -> 4096, '128K' -> 131072, '100' -> 100."""
    t = text.strip().lower()
    try:
        return int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512, 4k, 128k)") from None


def weight_bytes_per_step(model: nn.Module) -> int:
    """Parameter bytes a decode step reads: all but embedding tables that are only looked up."""
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookup -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in lookup)


def measure_order(contexts: list[int]) -> list[int]:
    """The contexts the targets need first (32k, then the shortest and longest), so that a run cut
    short by --deadline_s still has them; the report is sorted by context afterwards."""
    first = [c for c in (TARGET_CONTEXT, min(contexts), max(contexts)) if c in contexts]
    first = list(dict.fromkeys(first))
    return first + sorted(c for c in contexts if c not in first)


@torch.no_grad()
def prefill(model: nn.Module, cache: InferenceCache, ids: torch.Tensor, chunk: int) -> None:
    """Consume ids in chunks of `chunk` tokens (one call when chunk <= 0), keeping no logits."""
    step = ids.shape[1] if chunk <= 0 else chunk
    for s in range(0, ids.shape[1], step):
        model(ids[:, s : s + step], cache=cache)


@torch.no_grad()
def time_decode(
    model: nn.Module, cache: InferenceCache, start: int, cfg: BenchConfig, vocab: int, use_graph: bool
) -> float:
    """Seconds per decode step at positions start.., one figure per round of cfg.steps steps
    (warm-up excluded); every round starts from the same position."""
    device = cache.position.device
    cache.set_seq_len(start)
    step = DecodeStep(model, cache, cuda_graph=use_graph, preserve_state=False)
    tokens = torch.randint(0, vocab, (cache.batch_size, 1), device=device)
    for _ in range(cfg.warmup):
        step(tokens)
    rounds = []
    for _ in range(cfg.rounds):
        cache.set_seq_len(start)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            step(tokens)
        synchronize(device)
        rounds.append((time.perf_counter() - t0) / cfg.steps)
    return rounds


@dataclass(frozen=True)
class Limits:
    """The device's memory bandwidth (bytes/s) and dense peak (FLOP/s) the roofline divides by."""

    bandwidth: float | None
    peak: float | None
    source: str = ""

    def bound(self, nbytes: float, flops: float) -> tuple[float, str] | None:
        """(the least time a step can take, "memory" or "compute"), None without a bandwidth."""
        if not self.bandwidth:
            return None
        memory_s, compute_s = nbytes / self.bandwidth, flops / self.peak if self.peak else 0.0
        return (memory_s, "memory") if memory_s >= compute_s else (compute_s, "compute")


def device_limits(cfg: BenchConfig) -> Limits:
    """Flags first, then the device's datasheet figures (avengers.hardware); a GPU missing from the
    table gets its bandwidth from a measured device-to-device copy; a CPU needs --bandwidth_gbs."""
    spec = device_spec(cfg.device)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else spec.bf16_flops
    if cfg.bandwidth_gbs:
        return Limits(cfg.bandwidth_gbs * 1e9, peak, "--bandwidth_gbs")
    if spec.bandwidth:
        return Limits(spec.bandwidth, peak, f"datasheet ({spec.name})")
    if torch.device(cfg.device).type == "cuda":
        return Limits(measure_copy_bandwidth(cfg.device), peak, f"measured copy ({spec.name})")
    return Limits(None, peak)


def _largest_batch(cache_per_seq: float, device: torch.device, cfg: BenchConfig) -> int | None:
    """Analytic guess from free GPU memory (verified by running it, see _measure_batch); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cfg.max_batch_cap, int(free * cfg.memory_fraction // cache_per_seq)))


@dataclass
class VariantResult:
    variant: str
    family: str
    params: int
    weight_bytes: int
    check: dict | None = None
    decode_mode: str = "eager"
    errors: list[str] = field(default_factory=list)
    decode_path: str = ""  # the resolved DecodeOptions path the variant ran
    peer: str = ""  # the peer timed beside ours and its check, "" without one


def bench_variant(name: str, cfg: BenchConfig, limits: Limits, rows: list[dict], deadline: float) -> VariantResult:
    """Checks, then every context; measurements that would start after `deadline` (monotonic) are
    skipped, except the first one, so that every variant reports a row even when its checks (cold
    compiles, autotuning) used its share of the time."""
    spec = get_model_spec(name)
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    model = spec.build(device)
    model.init_weights()
    model.eval()
    res = VariantResult(name, spec.family, sum(p.numel() for p in model.parameters()), 0)
    check = _run_checks(model, spec.vocab_size, device, dtype, cfg)
    res.check = asdict(check)
    res.weight_bytes = weight_bytes_per_step(model)
    chunk = cfg.prefill_chunk if check.chunked_prefill else 0
    res.decode_mode = check.decode_mode
    peer = _build_peer(model, spec, check, res, cfg) if _peer_wanted(cfg, spec.family) else None
    first = len(rows)
    for ctx in measure_order(cfg.contexts):
        measured = len(rows) > first
        if measured and time.monotonic() > deadline:
            res.errors.append(f"context {ctx}: skipped, this variant's share of --deadline_s was used up")
            continue
        try:
            _bench_context(model, spec, ctx, chunk, limits, res, cfg, rows, deadline, not measured, peer)
        except torch.cuda.OutOfMemoryError as e:
            res.errors.append(f"context {ctx}: out of memory at batch 1 ({str(e).splitlines()[0]})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model, peer
    return res


def _peer_wanted(cfg: BenchConfig, family: str) -> bool:
    if cfg.peer == "off" or family != "mamba" or torch.device(cfg.device).type != "cuda":
        return False
    reason = peer_mod.import_error() if cfg.peer == "auto" else None  # forced: validate() imported it
    if reason:
        log.info("no peer column: mamba_ssm does not import (%s)", reason)
    return not reason


def _build_peer(model: nn.Module, spec, check: CheckResult, res: VariantResult, cfg: BenchConfig) -> nn.Module | None:
    """mamba_ssm's model on our weights once its batch-1 logits match ours in fp32 and in the timed
    dtype; None (and the reason in res.errors) when it cannot be built or disagrees, e.g. hybrids
    whose attention needs flash-attn."""
    dtype = DTYPES[cfg.dtype]
    # fp32 finds wiring errors (a decode that drops its state moves random-weight logits by only a
    # few %, bf16 noise by ~2%); the timed dtype gets the tolerance the timed-dtype check gave ours
    tols = {torch.float32: cfg.check_tol or 1e-2, dtype: check.dtype_tol or cfg.check_tol or 1e-2}
    errs = {}
    try:
        peer = peer_mod.build_peer(model)  # shares our Parameter objects: the casts below cast both
        for dt, tol in tols.items():
            model.to(dt)
            errs[dt] = peer_mod.check_peer(model, peer, spec.vocab_size, tol, options=cfg.options)
    except Exception as e:  # any failure in mamba_ssm leaves our numbers standing, without the column
        log.warning("%s: peer unavailable: %s: %s", res.variant, type(e).__name__, e)
        res.errors.append(f"peer unavailable: {type(e).__name__}: {e}")
        return None
    finally:
        model.to(dtype)
    res.peer = (
        f"mamba_ssm graph decode (its SSM state in the model's dtype, {cfg.dtype}; ours in "
        f"{cfg.ssm_state}), batch-1 logits vs ours: "
        + ", ".join(
            f"rel err {err:.2g} in {str(dt).removeprefix('torch.')} (tol {tols[dt]:.2g})" for dt, err in errs.items()
        )
    )
    return peer


def _peer_columns(
    peer: nn.Module, row: dict, ctx: int, fill: int, vocab: int, res: VariantResult, cfg: BenchConfig
) -> dict:
    try:
        rounds = peer_mod.time_peer(peer, row["batch"], fill, ctx, vocab, cfg.warmup, cfg.rounds, cfg.steps)
    except Exception as e:  # e.g. out of memory beside our cache: our row stands, the peer cells stay empty
        res.errors.append(f"context {ctx} batch {row['batch']}: peer failed ({type(e).__name__}: {e})")
        return {}
    step_ms = statistics.median(rounds) * 1e3
    return dict(
        peer_step_ms=step_ms,
        peer_step_ms_min=min(rounds) * 1e3,
        peer_step_ms_max=max(rounds) * 1e3,
        vs_peer=row["decode_step_ms"] / step_ms,
    )


def _run_checks(
    model: nn.Module, vocab: int, device: torch.device, dtype: torch.dtype, cfg: BenchConfig
) -> CheckResult:
    on_cuda = device.type == "cuda"
    tol = cfg.check_tol or (1e-2 if on_cuda else 1e-4)
    model.float()
    check = check_cached_decode(model, vocab, device, tol=tol, seed=cfg.seed, options=cfg.options)
    case = timed_dtype_case(model, vocab, device, seed=cfg.seed + 2) if dtype != torch.float32 else None
    model.to(dtype)
    if case is not None:  # the timed dtype's own batch-1 path (some serve bf16 only)
        check.dtype_rel_err, check.dtype_tol = check_timed_dtype(model, *case, options=cfg.options)
    if on_cuda and cfg.cuda_graph:
        try:
            check.graph_rel_err = check_graph_decode(model, vocab, device, seed=cfg.seed + 1, options=cfg.options)
            check.decode_mode = "cuda_graph"
        except (DecodeMismatch, ValueError, RuntimeError) as e:  # e.g. a decode position from a Python int
            log.warning("%s: CUDA-graph decode unusable, timing eager decode: %s", type(model).__name__, e)
            check.notes.append(f"CUDA-graph decode unusable ({type(e).__name__}: {e}); decode timed eagerly")
            check.decode_mode = "eager (graph check failed)"
    return check


def _bench_context(
    model,
    spec,
    ctx: int,
    chunk: int,
    limits: Limits,
    res: VariantResult,
    cfg: BenchConfig,
    rows: list[dict],
    deadline: float,
    first_row_due: bool,
    peer: nn.Module | None = None,
) -> None:
    """Every batch at one context; none starts after `deadline`, except the first where
    `first_row_due` (the variant has no row yet)."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    fill = ctx - cfg.room
    cache1 = model.allocate_cache(1, ctx, device, dtype, cfg.options)
    res.decode_path = cache1.options.path
    ids = torch.randint(0, spec.vocab_size, (1, fill), device=device)
    synchronize(device)
    t0 = time.perf_counter()
    prefill(model, cache1, ids, chunk)
    synchronize(device)
    prefill_s = time.perf_counter() - t0
    per_seq = cache1.nbytes_per_sequence()
    largest = _largest_batch(per_seq, device, cfg) if cfg.find_max_batch else None
    batches = sorted(
        {b for b in cfg.batch_sizes if largest is None or b <= largest} | ({largest} if largest else set())
    )
    common = dict(
        variant=res.variant,
        family=res.family,
        context=ctx,
        prefill_tokens=fill,
        prefill_s=prefill_s,
        prefill_tok_s=fill / prefill_s,
        cache_bytes_per_seq=per_seq,
    )
    ctx_rows, fits = [], None
    for b in batches:
        if time.monotonic() > deadline and (ctx_rows or not first_row_due):
            res.errors.append(f"context {ctx} batch {b}: skipped, deadline reached")
            break
        row = _measure_batch(model, spec, cache1, fill, b, b == largest, limits, res, cfg)
        if row is None:
            continue
        fits = row.pop("_fits") or fits
        # not at the searched largest batch: the peer's own cache would not fit beside ours
        if peer is not None and b in cfg.batch_sizes and b != largest:
            row.update(_peer_columns(peer, row, ctx, fill, spec.vocab_size, res, cfg))
        ctx_rows.append({**common, **row})
        log.info(
            "%s ctx=%d batch=%d: %.3f ms/step, %.0f tok/s",
            res.variant,
            ctx,
            row["batch"],
            row["decode_step_ms"],
            row["decode_tok_s"],
        )
    for row in ctx_rows:  # the largest batch verified by a run at this context (None: not searched)
        row["max_batch"] = fits
    rows.extend(ctx_rows)
    del cache1


def _measure_batch(
    model,
    spec,
    cache1: InferenceCache,
    fill: int,
    batch: int,
    is_largest: bool,
    limits: Limits,
    res: VariantResult,
    cfg: BenchConfig,
) -> dict | None:
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    for _attempt in range(5):  # the largest batch is verified by running it; shrink on OOM
        cache = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if batch == 1:
                cache = cache1
            else:
                cache = model.allocate_cache(batch, cache1.max_seq_len, device, dtype, cfg.options)
                cache1.set_seq_len(fill)
                cache.broadcast_from(cache1)
            rounds = time_decode(model, cache, fill, cfg, spec.vocab_size, res.decode_mode == "cuda_graph")
            step_s = statistics.median(rounds)
            profiled = profile_steps(model, cache, fill, cfg.steps, spec.vocab_size) if cfg.profile else None
            nbytes, written = cache.nbytes(), cache.nbytes_written_per_step()
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            # the weights and the whole cache are read; what the step changes is written back
            moved = res.weight_bytes + nbytes + written
            # a decode step's forward FLOPs: a third of the training (fwd + bwd) FLOPs per token at this context
            flops = batch * spec.flops_per_token(cache1.max_seq_len) / 3
            bound = limits.bound(moved, flops)
            return dict(
                batch=batch,
                decode_step_ms=step_s * 1e3,
                decode_step_ms_min=min(rounds) * 1e3,
                decode_step_ms_max=max(rounds) * 1e3,
                rounds=len(rounds),
                decode_tok_s=batch / step_s,
                cache_bytes=nbytes,
                cache_bytes_written=written,
                peak_mem_gib=peak,
                bytes_per_step=moved,
                flops_per_step=flops,
                roofline_ms=bound[0] * 1e3 if bound else None,
                roofline_bound=bound[1] if bound else None,
                roofline_ratio=step_s / bound[0] if bound else None,
                decode_mode=res.decode_mode,
                _fits=batch if is_largest else None,
                **({"profile": profiled} if profiled else {}),
            )
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            # an allocation failing inside a graph capture surfaces as a RuntimeError
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            if not is_largest or batch == 1:
                res.errors.append(f"context {cache1.max_seq_len} batch {batch}: out of memory")
                return None
            batch = max(1, int(batch * 0.8))
        finally:
            if cache is not None and cache is not cache1:
                del cache
    return None


def _default_variants(device: str) -> list[str]:
    known = list_variants()
    if device.startswith("cuda"):
        missing = [v for v in GPU_DEFAULT_VARIANTS if v not in known]
        if missing:
            log.warning("default GPU variants not registered (skipped): %s", ", ".join(missing))
        return [v for v in GPU_DEFAULT_VARIANTS if v in known]
    return [v for v in known if "tiny" in v]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m avengers.bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants", help="comma-separated registry variants (default: *tiny* on CPU, the 1.3-2B set on CUDA)"
    )
    p.add_argument(
        "--contexts", default=None, help="comma-separated, e.g. 1k,4k,16k,32k,64k,128k (CPU default 128,256,512)"
    )
    p.add_argument("--batch_sizes", default=None, help="comma-separated (CUDA default 1,8,64; CPU 1,2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_max_batch", action="store_true", help="skip the largest-batch search")
    p.add_argument("--max_batch_cap", type=int, default=4096)
    p.add_argument("--memory_fraction", type=float, default=0.9)
    p.add_argument(
        "--bandwidth_gbs",
        type=float,
        default=None,
        help="memory bandwidth for the roofline, GB/s (default: the GPU's own; CPU: no roofline)",
    )
    p.add_argument(
        "--peak_tflops", type=float, default=None, help="dense bf16 peak for the roofline (default: the GPU's own)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of --steps steps; the median is reported")
    p.add_argument(
        "--prefill_chunk",
        type=int,
        default=0,
        help="prefill in chunks of N tokens where the family's chunked prefill checks out (0: one call)",
    )
    p.add_argument("--no_cuda_graph", action="store_true")
    p.add_argument("--deadline_s", type=float, default=450.0)
    p.add_argument("--check_tol", type=float, default=None)
    p.add_argument(
        "--decode",
        default="auto",
        choices=DECODE_PATHS,
        help="decode path (docs/inference.md): auto = the fastest tested path for the family, device and "
        "batch; reference = per-module torch; compile = torch.compile'd steps; triton = fused Triton GEMVs "
        "at batch 1 (else compile); gluon = a Llama's batch-1 step as one Hopper kernel (else triton)",
    )
    p.add_argument(
        "--decode_attn",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="attention decode kernel: Triton on CUDA when it passes its self-test (auto), or forced",
    )
    p.add_argument(
        "--ssm_state",
        default="fp32",
        choices=SSM_STATE_DTYPES,
        help="dtype of Mamba-2 layers' SSM state: fp32, or the model's dtype (model; as mamba_ssm's decode "
        "keeps it: half the bytes a large-batch step moves)",
    )
    p.add_argument(
        "--peer",
        default="auto",
        choices=peer_mod.PEER_MODES,
        help="also time mamba_ssm's own CUDA-graph decode on the same weights (Mamba family): auto = on CUDA "
        "when mamba_ssm imports; mamba_ssm = required (fails early without it); off",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="per row, also profile --steps eager decode steps: time per kernel, launches, and the share "
        "of the timed step the kernels fill (where a step's time goes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    split = lambda s: [x for x in s.split(",") if x.strip()]  # noqa: E731
    cfg = BenchConfig(
        variants=split(a.variants) if a.variants else _default_variants(a.device),
        contexts=[parse_size(c) for c in split(a.contexts or ("1k,4k,16k,32k,64k,128k" if cuda else "128,256,512"))],
        batch_sizes=[int(b) for b in split(a.batch_sizes or ("1,8,64" if cuda else "1,2"))],
        device=a.device,
        dtype=a.dtype or ("bf16" if cuda else "fp32"),
        steps=a.steps,
        warmup=a.warmup,
        find_max_batch=not a.no_max_batch,
        max_batch_cap=a.max_batch_cap,
        memory_fraction=a.memory_fraction,
        bandwidth_gbs=a.bandwidth_gbs,
        peak_tflops=a.peak_tflops,
        rounds=a.rounds,
        prefill_chunk=a.prefill_chunk,
        cuda_graph=not a.no_cuda_graph,
        deadline_s=a.deadline_s,
        out=a.out,
        seed=a.seed,
        check_tol=a.check_tol,
        decode=a.decode,
        decode_attn=a.decode_attn,
        ssm_state=a.ssm_state,
        peer=a.peer,
        profile=a.profile,
    )
    cfg.validate()
    return cfg


def run(cfg: BenchConfig) -> dict:
    """Benchmark every variant; returns (and writes to cfg.out) the JSON report."""
    cfg.validate()
    t_start = time.monotonic()
    rows: list[dict] = []
    variants = {}
    limits = device_limits(cfg)
    share = cfg.deadline_s / len(cfg.variants)  # time left over by one variant passes to the next
    for i, name in enumerate(cfg.variants):
        try:
            variants[name] = asdict(bench_variant(name, cfg, limits, rows, t_start + share * (i + 1)))
        except Exception as e:  # one family's failure must not hide the others' numbers
            log.exception("variant %s failed", name)
            variants[name] = {"variant": name, "errors": [f"{type(e).__name__}: {e}"], "failed": True}
        gc.collect()  # drop the model and any captured graphs before the next variant
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.device(cfg.device)
    report = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.monotonic() - t_start,
        "roofline": {
            "bandwidth_gbs": limits.bandwidth / 1e9 if limits.bandwidth else None,
            "peak_tflops": limits.peak / 1e12 if limits.peak else None,
            "source": limits.source,
        },
        "variants": variants,
        "rows": rows,
    }
    rows.sort(key=lambda r: (cfg.variants.index(r["variant"]), r["context"], r["batch"]))
    report["targets"] = targets_summary(rows)
    print(write_report(report, Path(cfg.out)))
    return report


def merge_main(argv: list[str]) -> int:
    """`python -m avengers.bench --merge A.json B.json ... [--out DIR]`: one table and plots from several runs."""
    p = argparse.ArgumentParser(prog="python -m avengers.bench --merge")
    p.add_argument("--merge", nargs="+", required=True, metavar="JSON", help="inference_bench.json files, later wins")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    a = p.parse_args(argv)
    missing = [f for f in a.merge if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"python -m avengers.bench --merge: no such file(s): {', '.join(missing)}")
    print(write_report(merge_reports([json.loads(Path(f).read_text()) for f in a.merge]), Path(a.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "--merge" in argv:
        return merge_main(argv)
    try:
        cfg = parse_args(argv)
    except ValueError as e:  # bad flags: say which, before any model is built
        raise SystemExit(f"python -m avengers.bench: {e}") from None
    report = run(cfg)
    failed = [n for n, v in report["variants"].items() if v.get("failed")]
    if failed:
        print(f"FAILED variants: {', '.join(failed)} (see errors in inference_bench.json)")
        return 1
    return 0
