"""The bench's --peer column (mamba_ssm's graph decode) on CPU: flags, the bench around a stand-in
peer, and the report. The real peer runs in test_gpu.py."""

import json

import pytest
import torch

from avengers.inference import bench
from avengers.inference import peer as peer_mod
from avengers.inference.bench import BenchConfig, parse_args
from avengers.inference.bench_report import markdown_table, targets_summary
from avengers.inference.check import DecodeMismatch

PEER_KEYS = {"peer_step_ms", "peer_step_ms_min", "peer_step_ms_max", "vs_peer"}


def _bench(tmp_path, *flags):
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--variants",
            "mamba2_tiny",
            "--contexts",
            "128",
            "--batch_sizes",
            "1,2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "3",
            "--out",
            str(tmp_path),
            *flags,
        ]
    )
    assert rc == 0
    return json.loads((tmp_path / "inference_bench.json").read_text()), (tmp_path / "inference_bench.md").read_text()


def test_forced_peer_fails_before_any_model_is_built(monkeypatch):
    def no_model(name):
        raise AssertionError(f"model {name} built")

    monkeypatch.setattr(bench, "get_model_spec", no_model)
    with pytest.raises(ValueError, match="--peer mamba_ssm needs a CUDA device .* got 'cpu'"):
        parse_args(["--device", "cpu", "--peer", "mamba_ssm"])
    with pytest.raises(SystemExit, match="--peer mamba_ssm needs a CUDA device"):
        bench.main(["--device", "cpu", "--variants", "mamba2_tiny", "--peer", "mamba_ssm"])
    with pytest.raises(ValueError, match="peer must be one of .* got 'fla'"):
        BenchConfig(variants=["mamba2_tiny"], contexts=[128], batch_sizes=[1], device="cpu", peer="fla").validate()
    # on a CUDA host without mamba_ssm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(peer_mod, "import_error", lambda: "ModuleNotFoundError: No module named 'mamba_ssm'")
    cfg = BenchConfig(variants=["mamba2_tiny"], contexts=[128], batch_sizes=[1], device="cuda", peer="mamba_ssm")
    with pytest.raises(ValueError, match=r"mamba_ssm does not import \(ModuleNotFoundError"):
        cfg.validate()


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_no_peer_column_on_cpu(tmp_path, mode):
    report, md = _bench(tmp_path, "--peer", mode)
    assert report["config"]["peer"] == mode and len(report["rows"]) == 2
    assert not any(PEER_KEYS & set(r) for r in report["rows"])
    variant = report["variants"]["mamba2_tiny"]
    assert variant["peer"] == "" and variant["errors"] == []
    assert "mamba_ssm" not in md and "| mamba2_tiny | 128 | 2 |" in md


@pytest.fixture
def stand_in_peer(monkeypatch):
    """The bench's peer calls without mamba_ssm: a peer that takes 2 ms a step and records its calls;
    the searched largest batch is 3."""
    calls = []

    def check(model, peer, vocab, tol, options=None):
        calls.append(("check", next(model.parameters()).dtype))
        return 1e-3

    def time_peer(peer, batch, start, max_seqlen, vocab, warmup, rounds, steps):
        calls.append(("time", batch, start, max_seqlen))
        return [1e-3, 2e-3, 4e-3][:rounds]

    monkeypatch.setattr(bench, "_peer_wanted", lambda cfg, family: family == "mamba")
    monkeypatch.setattr(bench, "_largest_batch", lambda per_seq, device, cfg: 3)
    monkeypatch.setattr(peer_mod, "build_peer", lambda model: object())
    monkeypatch.setattr(peer_mod, "check_peer", check)
    monkeypatch.setattr(peer_mod, "time_peer", time_peer)
    return calls


def test_peer_columns_at_the_listed_batches(tmp_path, stand_in_peer):
    report, md = _bench(tmp_path, "--dtype", "bf16")
    rows = {r["batch"]: r for r in report["rows"]}
    assert set(rows) == {1, 2, 3}
    for b in (1, 2):
        r = rows[b]
        assert (r["peer_step_ms"], r["peer_step_ms_min"], r["peer_step_ms_max"]) == pytest.approx((2, 1, 4))
        assert r["vs_peer"] == pytest.approx(r["decode_step_ms"] / 2)
    assert not PEER_KEYS & set(rows[3])  # the searched largest batch: no peer beside our cache
    # checked in fp32, then in the timed dtype; timed at the bench's shape, positions after the prefill
    assert stand_in_peer == [
        ("check", torch.float32),
        ("check", torch.bfloat16),
        ("time", 1, 128 - 3, 128),  # room: max(steps, warmup) + 1
        ("time", 2, 128 - 3, 128),
    ]
    assert next(iter(report["variants"].values()))["peer"].startswith("mamba_ssm graph decode")
    assert "| mamba_ssm graph ms/step | ours/mamba_ssm |" in md
    assert "| 2.000 |" in md and "mamba2_tiny@128 b1" in md
    assert report["targets"]["step_ms_vs_mamba_ssm_graph_decode"]["mamba2_tiny@128 b1"] == rows[1]["vs_peer"]


def test_a_peer_that_disagrees_leaves_the_column_empty(tmp_path, stand_in_peer, monkeypatch):
    def mismatch(model, peer, vocab, tol, options=None):
        raise DecodeMismatch("mamba_ssm's graph decode differs from ours")

    monkeypatch.setattr(peer_mod, "check_peer", mismatch)
    report, md = _bench(tmp_path)
    assert report["rows"] and not any(PEER_KEYS & set(r) for r in report["rows"])
    assert report["variants"]["mamba2_tiny"]["errors"] == [
        "peer unavailable: DecodeMismatch: mamba_ssm's graph decode differs from ours"
    ]
    assert report["config"]["dtype"] == "fp32"
    assert "mamba_ssm graph ms/step" not in md and "peer unavailable" in md


def test_report_shows_the_peer_column_only_when_a_row_has_it():
    row = dict(
        variant="mamba2_1.3b",
        family="mamba",
        context=1024,
        batch=1,
        prefill_s=0.1,
        decode_step_ms=1.0,
        decode_step_ms_min=0.9,
        decode_step_ms_max=1.1,
        decode_tok_s=1000.0,
        cache_bytes_per_seq=2**20,
        peak_mem_gib=None,
        max_batch=None,
        roofline_ms=None,
        roofline_bound=None,
        roofline_ratio=None,
    )
    peer = dict(peer_step_ms=1.25, peer_step_ms_min=1.2, peer_step_ms_max=1.3, vs_peer=0.8)
    rows = [{**row, **peer}, {**row, "batch": 8}]
    report = {
        "device": "NVIDIA H100",
        "torch": "2.13",
        "date": "today",
        "wall_s": 1.0,
        "config": {"dtype": "bf16"},
        "variants": {"mamba2_1.3b": {"check": {}, "peer": "mamba_ssm graph decode, rel err 0.001"}},
        "rows": rows,
        "targets": targets_summary(rows),
    }
    md = markdown_table(report)
    assert "| measured/roofline | mamba_ssm graph ms/step | ours/mamba_ssm |" in md
    assert "|" + "---|" * 15 in md
    assert "| 1 | 0.100 | 1.000 |" in md and "| 1.250 | 0.80 |" in md
    assert "| n/a | n/a | n/a | n/a | n/a |" in md  # batch 8: roofline and peer cells empty
    assert "peer: mamba_ssm graph decode, rel err 0.001" in md
    assert "vs mamba_ssm's graph decode (at most 1 meets the target): mamba2_1.3b@1024 b1 0.80" in md
    plain = markdown_table({**report, "rows": [r for r in rows if "vs_peer" not in r], "targets": targets_summary([])})
    assert "graph ms/step" not in plain and "|" + "---|" * 14 not in plain
