"""Choose the decode GEMVs' tiles by the time of the whole decode step, not of each kernel alone.

Triton's autotuner times a kernel alone, back to back with itself. In the batch-1 decode chain a
GEMV starts while its predecessor drains (PDL), waits for its input and hands over to the next
kernel, so its cost there also depends on its neighbours; re-running the autotuner picked
different tiles each time, and those picks gave 1k steps from 1.35 to 1.57 ms on one H200
(docs/benchmarks.md). `tune` starts from the autotuner's picks and, one kernel shape at a time,
tries every config the autotuner considers for that shape, keeping the one with the shortest
step. `python -m avengers.bench --tune_gemv` runs it before timing a batch the GEMV steps serve (batch 1).
"""

from __future__ import annotations

from collections.abc import Callable

MIN_GAIN = 0.005  # a config replaces the current one only if the step gets at least this much shorter


def decode_gemv_kernels() -> dict:
    """The autotuned decode GEMVs of triton_gemv.py (triton.runtime.Autotuner objects) by name."""
    from avengers.inference import triton_gemv

    return {"gemv": triton_gemv._gemv_kernel, "qkv": triton_gemv._qkv_rope_kernel}


def _key_value(kernel, key: tuple, name: str):
    return key[kernel.keys.index(name)]  # an autotuner's cache key starts with its key arguments, in order


def candidates(kernel, key: tuple) -> list:
    """The configs the autotuner would time for this key (its early pruning applied, which for the
    GEMVs depends on the batch block BB only)."""
    prune = kernel.early_config_prune
    return prune(kernel.configs, {"BB": _key_value(kernel, key, "BB")}) if prune else list(kernel.configs)


def describe(config) -> str:
    return " ".join(f"{k}{v}" for k, v in config.kwargs.items()) + f" w{config.num_warps}"


def tune(
    step_ms: Callable[[], float],
    block_batch: int,
    kernels: dict | None = None,
    passes: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Coordinate descent over the autotuned entries of `kernels` (default: the decode GEMVs) whose
    batch block BB is `block_batch`, by step_ms(): the time of one whole step with the configs now
    in the kernels' caches (it must re-capture any CUDA graph). The choices stay in the caches;
    returns {"kernel (K, N, ...)": config}."""
    kernels = kernels or decode_gemv_kernels()
    for kernel in kernels.values():  # entries of an earlier model's shapes are not this step's to tune
        for key in [k for k in kernel.cache if _key_value(kernel, k, "BB") == block_batch]:
            del kernel.cache[key]
    step_ms()  # the autotuners fill their caches with this step's shapes
    for _ in range(passes):
        for name, kernel in kernels.items():
            for key in [k for k in kernel.cache if _key_value(kernel, k, "BB") == block_batch]:
                chosen = kernel.cache[key]
                best = step_ms()  # the current choice, timed again: a machine's speed drifts
                for config in candidates(kernel, key):
                    if describe(config) == describe(chosen):
                        continue
                    kernel.cache[key] = config
                    ms = step_ms()
                    if ms < best * (1 - MIN_GAIN):
                        chosen, best = config, ms
                kernel.cache[key] = chosen
                if log:
                    log(f"{name}{key[: len(kernel.keys)]}: {describe(chosen)}, step {best:.4f} ms")
    return {
        f"{name}{key[: len(kernel.keys)]}": describe(config)
        for name, kernel in kernels.items()
        for key, config in kernel.cache.items()
        if _key_value(kernel, key, "BB") == block_batch
    }
