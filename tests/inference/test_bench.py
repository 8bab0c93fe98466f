"""CPU smoke test of the inference benchmark with every registered tiny variant."""

import json

import pytest
import torch

from avengers.decode import llama as llama_decode
from avengers.inference import bench
from avengers.inference.bench import BenchConfig, parse_args, parse_size, run
from avengers.inference.check import DecodeMismatch, check_cached_decode, check_timed_dtype, timed_dtype_case
from avengers.models.registry import get_model_spec, list_variants


def test_smoke_every_tiny_variant(tmp_path):
    variants = [v for v in list_variants() if "tiny" in v]
    assert "llama3_tiny" in variants
    cfg = parse_args(
        [
            "--device",
            "cpu",
            "--contexts",
            "128,256",
            "--batch_sizes",
            "1,2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--bandwidth_gbs",
            "20",
            "--rounds",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert cfg.variants == variants
    report = run(cfg)
    assert not any(v.get("failed") for v in report["variants"].values()), report["variants"]
    rows = report["rows"]
    assert {(r["variant"], r["context"], r["batch"]) for r in rows} == {
        (v, c, b) for v in variants for c in (128, 256) for b in (1, 2)
    }
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_s"] > 0 and r["roofline_ratio"] > 0
        # rel: a telescoping cache's ring map (C longs) is shared by the batch
        assert r["cache_bytes"] == pytest.approx(r["batch"] * r["cache_bytes_per_seq"], rel=1e-2)
        assert r["rounds"] == 3 and r["decode_step_ms_min"] <= r["decode_step_ms"] <= r["decode_step_ms_max"]
        # no FLOP peak on a CPU: the bound is the bytes at --bandwidth_gbs
        assert r["roofline_bound"] == "memory" and r["roofline_ms"] == pytest.approx(r["bytes_per_step"] / 20e6)
        assert 0 < r["cache_bytes_written"] <= r["cache_bytes"] < r["bytes_per_step"]
        if r["variant"] == "mamba2_tiny":  # a recurrent state is rewritten whole
            assert r["cache_bytes_written"] == r["cache_bytes"], r["variant"]
        if r["variant"] == "tele_tiny":  # so are shifted slots; not the ring map, shared and unmoved
            cfg = get_model_spec("tele_tiny").config
            ring = cfg.tele_cache_size * 8  # one [C] long map for the cache
            assert r["cache_bytes_written"] == r["cache_bytes"] - ring, r["variant"]
    assert report["roofline"] == {"bandwidth_gbs": 20.0, "peak_tflops": None, "source": "--bandwidth_gbs"}
    llama = {r["context"]: r["cache_bytes_per_seq"] for r in rows if r["variant"] == "llama3_tiny"}
    assert llama[256] == 2 * llama[128]  # KV cache grows linearly
    for name in variants:
        assert report["variants"][name]["check"]["max_rel_err"] < 1e-4
    saved = json.loads((tmp_path / "inference_bench.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert "| llama3_tiny | 256 | 2 |" in (tmp_path / "inference_bench.md").read_text()
    for png in ("decode_tok_s_vs_context.png", "cache_mib_vs_context.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    # --merge: a rerun of one variant replaces that variant's rows; the targets are recomputed
    rerun = {
        **saved,
        "variants": {"llama3_tiny": saved["variants"]["llama3_tiny"]},
        "rows": [{**r, "decode_tok_s": 2 * r["decode_tok_s"]} for r in saved["rows"] if r["variant"] == "llama3_tiny"],
    }
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    merged_dir = tmp_path / "merged"
    assert (
        bench.main(
            ["--merge", str(tmp_path / "inference_bench.json"), str(tmp_path / "rerun.json"), "--out", str(merged_dir)]
        )
        == 0
    )
    merged = json.loads((merged_dir / "inference_bench.json").read_text())
    assert len(merged["rows"]) == len(rows) and set(merged["variants"]) == set(variants)
    by_key = {(r["variant"], r["context"], r["batch"]): r["decode_tok_s"] for r in merged["rows"]}
    for r in rows:
        factor = 2 if r["variant"] == "llama3_tiny" else 1
        assert by_key[(r["variant"], r["context"], r["batch"])] == pytest.approx(factor * r["decode_tok_s"])
    assert (merged_dir / "cache_mib_vs_context.png").exists()
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["--merge", str(tmp_path / "missing.json")])


def test_check_passes_a_correct_model_and_catches_a_wrong_cached_forward(tiny, monkeypatch):
    spec, model = tiny
    assert check_cached_decode(model, spec.vocab_size, torch.device("cpu")).max_rel_err < 1e-5
    monkeypatch.setattr(llama_decode, "apply_rope", lambda x, cos, sin: x)  # positions ignored
    with pytest.raises(DecodeMismatch, match="differs from the full forward"):
        check_cached_decode(model, spec.vocab_size, torch.device("cpu"))


def test_check_covers_paths_taken_at_batch_one_only(tiny, monkeypatch):
    spec, model = tiny
    rope = llama_decode.apply_rope
    monkeypatch.setattr(llama_decode, "apply_rope", lambda x, cos, sin: x if x.shape[0] == 1 else rope(x, cos, sin))
    with pytest.raises(DecodeMismatch, match="differs from the full forward"):
        check_cached_decode(model, spec.vocab_size, torch.device("cpu"))


def test_timed_dtype_check_passes_bf16_rounding_and_catches_a_broken_decode(tmp_path, monkeypatch):
    """Below fp32 the bench also checks the batch-1 path it times in that dtype (the gluon path
    serves bf16 only): bf16 noise (~1% of the top logit) passes, positions ignored do not."""
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--variants",
            "llama3_tiny",
            "--contexts",
            "128",
            "--batch_sizes",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--no_max_batch",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "inference_bench.json").read_text())
    err = report["variants"]["llama3_tiny"]["check"]["dtype_rel_err"]
    assert rc == 0 and 0 < err < 0.05
    assert "bf16 batch 1 vs full forward" in (tmp_path / "inference_bench.md").read_text()
    assert err <= report["variants"]["llama3_tiny"]["check"]["dtype_tol"]
    from avengers.models.registry import get_model_spec

    spec = get_model_spec("llama3_tiny")
    model = spec.build("cpu")
    model.init_weights()
    case = timed_dtype_case(model.eval(), spec.vocab_size, torch.device("cpu"))
    model = model.to(torch.bfloat16)
    err, tol = check_timed_dtype(model, *case)
    assert err < tol < 0.05
    monkeypatch.setattr(llama_decode, "apply_rope", lambda x, cos, sin: x)  # positions ignored
    with pytest.raises(DecodeMismatch, match="in torch.bfloat16 differs from the full forward"):
        check_timed_dtype(model, *case)


def test_failed_variant_is_reported_and_exit_code_nonzero(monkeypatch, tmp_path):
    monkeypatch.setattr(llama_decode, "apply_rope", lambda x, cos, sin: x)
    rc = bench.main(
        ["--device", "cpu", "--variants", "llama3_tiny", "--contexts", "128", "--steps", "1", "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "inference_bench.json").read_text())
    assert rc == 1 and report["variants"]["llama3_tiny"]["failed"] and report["rows"] == []


def test_config_errors():
    assert [parse_size(s) for s in ("4k", "128K", "100")] == [4096, 131072, 100]
    with pytest.raises(ValueError, match="not a size"):
        parse_size("4m")
    with pytest.raises(ValueError, match="unknown variants"):
        BenchConfig(variants=["nope"], contexts=[128], batch_sizes=[1], device="cpu").validate()
    with pytest.raises(ValueError, match="every context must be"):
        BenchConfig(variants=["llama3_tiny"], contexts=[8], batch_sizes=[1], device="cpu").validate()
    with pytest.raises(ValueError, match="decode path must be one of"):
        BenchConfig(variants=["llama3_tiny"], contexts=[128], batch_sizes=[1], device="cpu", decode="tvm").validate()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        BenchConfig(variants=["llama3_tiny"], contexts=[128], batch_sizes=[1], device="cpu", decode="triton").validate()
    assert parse_args(["--device", "cpu", "--decode", "compile"]).options.path == "compile"
    assert parse_args(["--device", "cpu"]).decode == "auto"


def test_roofline_is_the_larger_of_the_memory_and_compute_bounds():
    from avengers.inference.bench import Limits

    h100 = Limits(bandwidth=3.35e12, peak=989e12)
    assert h100.bound(nbytes=3.35e9, flops=1e11) == (pytest.approx(1e-3), "memory")  # batch 1: the weights
    assert h100.bound(nbytes=3.35e9, flops=9.89e12) == (pytest.approx(1e-2), "compute")  # a large batch
    assert Limits(bandwidth=1e9, peak=None).bound(1e9, 1e30) == (1.0, "memory")  # no peak known: bytes only
    assert Limits(bandwidth=None, peak=989e12).bound(1e9, 1e12) is None  # no bandwidth: no roofline


def test_device_limits_take_flags_over_the_datasheet(monkeypatch):
    from avengers.hardware import DeviceSpec
    from avengers.inference import bench as bench_mod

    cfg = BenchConfig(variants=["llama3_tiny"], contexts=[128], batch_sizes=[1], device="cpu")
    assert bench_mod.device_limits(cfg).bandwidth is None  # a CPU has no datasheet figure
    monkeypatch.setattr(bench_mod, "device_spec", lambda device: DeviceSpec("NVIDIA H100 80GB HBM3", 989e12, 3.35e12))
    limits = bench_mod.device_limits(cfg)
    assert (limits.bandwidth, limits.peak) == (3.35e12, 989e12) and "datasheet" in limits.source
    cfg.bandwidth_gbs, cfg.peak_tflops = 3000.0, 500.0
    limits = bench_mod.device_limits(cfg)
    assert (limits.bandwidth, limits.peak, limits.source) == (3000e9, 500e12, "--bandwidth_gbs")


def test_profile_rows_name_the_operators_and_their_time(tmp_path):
    """--profile on the CPU: each row gets the operators of `steps` eager steps, largest first."""
    argv = ["--device", "cpu", "--variants", "llama3_tiny,tele_tiny", "--contexts", "128", "--batch_sizes", "1"]
    report = run(parse_args([*argv, "--steps", "2", "--rounds", "1", "--profile", "--out", str(tmp_path)]))
    assert len(report["rows"]) == 2
    for r in report["rows"]:
        p = r["profile"]
        assert p["profiled_steps"] == 2 and p["kernel_ms_per_step"] > 0 and p["launches_per_step"] > 10
        times = [k["ms_per_step"] for k in p["top_kernels"]]
        assert times == sorted(times, reverse=True) and len(times) == 8
        assert any(k["name"] in ("aten::mm", "aten::addmm", "aten::linear") for k in p["top_kernels"])
    md = (tmp_path / "inference_bench.md").read_text()
    assert "- tele_tiny context 128 batch 1: kernels " in md
    assert "profile" not in run(parse_args([*argv, "--steps", "2", "--rounds", "1", "--out", str(tmp_path)]))["rows"][0]


def test_targets_judge_the_constant_cache_families_and_telescoping_against_llama():
    from avengers.inference.bench_report import markdown_table, targets_summary

    def row(variant, family, ctx, batch, ms, ratio, max_batch=None):
        return dict(
            variant=variant, family=family, context=ctx, batch=batch, decode_step_ms=ms, decode_tok_s=batch / ms,
            prefill_s=0.1, cache_bytes_per_seq=2**20, peak_mem_gib=None, max_batch=max_batch,
            roofline_ms=ms / ratio, roofline_bound="memory", roofline_ratio=ratio,
        )  # fmt: skip

    rows = [
        row("llama", "llama", 1024, 1, 1.0, 1.2),
        row("llama", "llama", 4096, 1, 1.2, 1.2),
        row("tele", "telescoping", 1024, 1, 1.0, 1.4),  # equal to Llama at 1k: met
        row("tele", "telescoping", 4096, 1, 1.2, 1.4),  # equal from 4k on: not met
        row("tele", "telescoping", 4096, 64, 3.0, 3.0),  # neither batch 1 nor the largest: not a target row
        row("tele", "telescoping", 4096, 4096, 40.0, 1.6, max_batch=4096),
    ]
    t = targets_summary(rows)
    assert t["constant_cache_measured_over_roofline"] == {
        "tele@1024 b1": 1.4,
        "tele@4096 b1": 1.4,
        "tele@4096 b4096 (largest)": 1.6,
    }
    assert t["telescoping_over_llama_batch1_ms"] == {
        "tele@1024 vs llama": {"ratio": 1.0, "context": 1024},
        "tele@4096 vs llama": {"ratio": 1.0, "context": 4096},
    }
    md = markdown_table(
        {"device": "H100", "torch": "2", "date": "d", "wall_s": 1, "config": {"dtype": "bf16"}, "variants": {},
         "rows": rows, "targets": t}
    )  # fmt: skip
    assert "(target at most 1.5): tele@1024 b1 1.40, met" in md
    assert "tele@4096 b4096 (largest) 1.60, not met" in md
    assert "(target at most 1): tele@1024 vs llama 1.00, met" in md
    assert "(target below 1): tele@4096 vs llama 1.00, not met" in md


def test_every_variant_reports_a_row_when_its_checks_use_up_its_deadline(tmp_path):
    """A deadline that the checks alone exceed still leaves each variant its first measurement (the
    first context's first batch); everything after it is skipped and said so."""
    cfg = parse_args(
        "--device cpu --variants llama3_tiny,mamba2_tiny --contexts 128,256 --batch_sizes 1,2 --steps 1 "
        f"--warmup 1 --rounds 1 --deadline_s 1e-6 --out {tmp_path}".split()
    )
    report = run(cfg)
    assert [(r["variant"], r["batch"]) for r in report["rows"]] == [("llama3_tiny", 1), ("mamba2_tiny", 1)]
    for v in report["variants"].values():
        assert any("deadline" in e for e in v["errors"]), v["errors"]
