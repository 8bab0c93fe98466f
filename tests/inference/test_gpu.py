"""CUDA-only checks of the decode path: graph replay, Triton attention inside the model, generate, bench."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny():
    from avengers.models.registry import get_model_spec

    torch.manual_seed(0)
    spec = get_model_spec("llama3_tiny")
    model = spec.build("cuda")
    model.init_weights()
    return spec, model.eval()


@torch.no_grad()
@pytest.mark.parametrize("path", ["auto", "reference"])
def test_graph_decode_matches_full_forward(tiny, path):
    """After a 200-token prefill, the step that consumes token i returns the logits at position i:
    full[:, i]. (An earlier version compared with full[:, i - 1], one position off.)"""
    from avengers.decode.options import DecodeOptions
    from avengers.inference.graphs import DecodeStep

    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (3, 300), device="cuda")
    full = model(ids)
    cache = model.allocate_cache(3, 300, options=DecodeOptions(path, attention="triton"))
    model(ids[:, :200], cache=cache)
    step = DecodeStep(model, cache, cuda_graph=True)
    got = torch.stack([step(ids[:, i : i + 1]).clone() for i in range(200, 300)], 1)
    torch.testing.assert_close(got, full[:, 200:300], atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_generate_with_and_without_graph_agree(tiny):
    from avengers.inference.generate import generate

    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (2, 17), device="cuda")
    assert torch.equal(generate(model, ids, 20, cuda_graph=False), generate(model, ids, 20, cuda_graph=True))


@torch.no_grad()
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_mamba_ssm_state_in_bf16_on_cuda(path):
    """DecodeOptions(ssm_state="model") with mamba_ssm's kernels: prefill into, and state updates on, a
    bf16 SSM state decode what the fp32 state does on CUDA and what our reference does on the CPU,
    to bf16's rounding; the batch-1 GEMV step (triton) and batch 2 (compiled steps) alike."""
    from avengers.decode.options import DecodeOptions
    from avengers.models.registry import get_model_spec

    torch.manual_seed(0)
    cpu = get_model_spec("mamba2_tiny").build("cpu").eval().to(torch.bfloat16)
    ids = torch.randint(0, 4096, (2, 40))

    def decode(model, batch, ssm_state):
        x = ids[:batch].to(next(model.parameters()).device)
        options = DecodeOptions(path if x.is_cuda else "reference", ssm_state=ssm_state)
        cache = model.allocate_cache(batch, 40, options=options)
        outs = [model(x[:, :16], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(16, 40)]
        return torch.cat(outs, 1).float().cpu()

    gpu = get_model_spec("mamba2_tiny").build("cuda").eval().to(torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    for batch in (1, 2):
        want = decode(cpu, batch, "model")
        got, fp32 = decode(gpu, batch, "model"), decode(gpu, batch, "fp32")
        scale = want.abs().max()
        assert (got - want).abs().max() < 0.05 * scale, batch
        assert (got - fp32).abs().max() < 0.05 * scale, batch


def _small_bench(tmp_path, variant: str, *flags: str) -> dict:
    """The bench on CUDA at contexts 128 and 1k, batches 1 and 4 plus the largest up to 64."""
    from avengers.inference.bench import parse_args, run

    argv = ["--device", "cuda", "--variants", variant, "--contexts", "128,1k", "--batch_sizes", "1,4"]
    return run(parse_args([*argv, "--steps", "3", "--max_batch_cap", "64", *flags, "--out", str(tmp_path)]))


def test_bench_smoke_on_cuda(tmp_path):
    report = _small_bench(tmp_path, "llama3_tiny")
    assert not report["variants"]["llama3_tiny"].get("failed")
    assert report["variants"]["llama3_tiny"]["decode_mode"] == "cuda_graph"
    assert {r["batch"] for r in report["rows"]} == {1, 4, 64}


def test_bench_profile_on_cuda(tmp_path):
    """--profile: every row gets its kernels' time per step, from CUDA kernels (the Triton GEMVs of
    the batch-1 step among them), less than the eager step that launched them."""
    report = _small_bench(tmp_path, "tele_tiny", "--profile", "--no_max_batch")
    for r in report["rows"]:
        p = r["profile"]
        assert 0 < p["kernel_ms_per_step"] and p["launches_per_step"] >= 1, r
        assert sum(k["share"] for k in p["top_kernels"]) <= 1 + 1e-9
        assert not any(k["name"].startswith("aten::") for k in p["top_kernels"]), p["top_kernels"]
    batch1 = [k["name"] for r in report["rows"] if r["batch"] == 1 for k in r["profile"]["top_kernels"]]
    assert any("gemv" in n for n in batch1), batch1
    assert "Kernel time per decode step" in (tmp_path / "inference_bench.md").read_text()


def test_bench_peer_column_on_cuda(tmp_path):
    """mamba_ssm's own graph decode timed beside ours at the listed batch sizes, after its batch-1
    logits matched ours; not at the searched largest batch (64 here, the cap)."""
    from avengers.inference import peer

    if peer.import_error():
        pytest.skip(f"mamba_ssm does not import: {peer.import_error()}")
    report = _small_bench(tmp_path, "mamba2_tiny", "--peer", "mamba_ssm")
    variant = report["variants"]["mamba2_tiny"]
    assert not variant.get("failed") and variant["errors"] == [], variant
    assert variant["peer"].startswith("mamba_ssm graph decode"), variant
    listed = [r for r in report["rows"] if r["batch"] in (1, 4)]
    assert {(r["context"], r["batch"]) for r in listed} == {(c, b) for c in (128, 1024) for b in (1, 4)}
    for r in listed:
        assert 0 < r["peer_step_ms_min"] <= r["peer_step_ms"] <= r["peer_step_ms_max"], r
        assert r["vs_peer"] == pytest.approx(r["decode_step_ms"] / r["peer_step_ms"]) and r["vs_peer"] > 0
    assert not any("peer_step_ms" in r for r in report["rows"] if r["batch"] == 64)
    assert "| mamba_ssm graph ms/step | ours/mamba_ssm |" in (tmp_path / "inference_bench.md").read_text()
