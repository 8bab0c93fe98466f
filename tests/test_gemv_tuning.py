"""gemv_tuning.tune: coordinate descent over autotuned configs by whole-step time (fake kernels, no GPU)."""

from dataclasses import dataclass, field

import pytest

from avengers.inference import gemv_tuning


@dataclass(frozen=True)
class Config:  # the two attributes of triton.Config that tuning reads
    kwargs: dict = field(hash=False)
    num_warps: int = 4


class FakeAutotuner:
    """What tune reads of triton.runtime.Autotuner: keys, configs, early_config_prune and cache."""

    keys = ["K", "N", "BB"]

    def __init__(self, configs, cache):
        self.configs, self.cache = configs, cache
        self.early_config_prune = lambda configs, named_args: [
            c for c in configs if named_args["BB"] * c.kwargs["BN"] <= 8
        ]


def test_tune_keeps_the_fastest_step_per_key_and_leaves_other_batches_alone():
    configs = [Config({"BN": bn}, w) for bn in (1, 2, 4, 8) for w in (4, 8)]
    picked = configs[0]
    stale = (16, 16, 1, "bf16")  # autotuned for another model's step: dropped, not tuned
    kernel = FakeAutotuner(configs, {stale: picked, (64, 32, 2, "bf16"): picked})
    # step time: each key at batch block 1 has its own best config; (64, 32) prefers BN4 w8, (32, 64) BN2 w4
    best = {(64, 32): Config({"BN": 4}, 8), (32, 64): Config({"BN": 2}, 4)}
    calls = []

    def step_ms():  # the step's two GEMV shapes, autotuned (to `picked`) on first use
        calls.append(1)
        for key in ((64, 32, 1, "bf16"), (32, 64, 1, "bf16")):
            kernel.cache.setdefault(key, picked)
        return 1.0 + sum(0.0 if kernel.cache[k] == best[k[:2]] else 0.1 for k in kernel.cache if k[2] == 1)

    chosen = gemv_tuning.tune(step_ms, 1, {"gemv": kernel}, passes=1)
    assert kernel.cache[(64, 32, 1, "bf16")] == best[(64, 32)]
    assert kernel.cache[(32, 64, 1, "bf16")] == best[(32, 64)]
    assert kernel.cache[(64, 32, 2, "bf16")] is picked  # another batch block is not this step's
    assert stale not in kernel.cache
    assert chosen == {"gemv(64, 32, 1)": "BN4 w8", "gemv(32, 64, 1)": "BN2 w4"}
    assert len(calls) == 1 + 2 * len(configs)  # a first step, then per key: the current pick and the 7 others


def test_tune_ignores_gains_below_the_noise_floor_and_respects_pruning():
    configs = [Config({"BN": bn}) for bn in (1, 2, 8)]
    kernel = FakeAutotuner(configs, {(64, 32, 2, "fp32"): configs[0]})
    times = {1: 1.0, 2: 1.0 * (1 - gemv_tuning.MIN_GAIN / 2), 8: 0.5}  # BN8 is fastest but pruned at BB 2
    tried = []

    def step_ms():
        bn = kernel.cache.setdefault((64, 32, 2, "fp32"), configs[0]).kwargs["BN"]
        tried.append(bn)
        return times[bn]

    gemv_tuning.tune(step_ms, 2, {"gemv": kernel}, passes=2)
    assert kernel.cache[(64, 32, 2, "fp32")] == configs[0]
    assert 8 not in tried


@pytest.mark.parametrize("fused", ["eager", "off"])
def test_bench_rejects_tune_gemv_without_the_triton_decode(fused):
    from avengers.inference.bench import BenchConfig

    cfg = BenchConfig(
        variants=["llama3_tiny"], contexts=[128], batch_sizes=[1], device="cpu", fused_decode=fused, tune_gemv=True
    )
    with pytest.raises(ValueError, match="tune_gemv.*'triton'"):
        cfg.validate()


def test_the_decode_gemvs_expose_what_tune_reads():
    pytest.importorskip("triton")
    for kernel in gemv_tuning.decode_gemv_kernels().values():
        assert "BB" in kernel.keys and kernel.early_config_prune is not None and isinstance(kernel.cache, dict)
        assert gemv_tuning.candidates(kernel, tuple(8 if k == "BB" else 0 for k in kernel.keys))
