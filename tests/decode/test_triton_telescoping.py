"""The Triton telescoping step kernel (kernels/triton_telescoping.py) against the torch step
(decode.telescoping.step_core / fused_qkv_step_core): slot state and read-out, step by step from
an empty cache through merges and evictions; and whole models decoding on the `triton` path.

Runs on CUDA (marked gpu), or on CPU through Triton's interpreter when triton is installed and
TRITON_INTERPRET=1 is set (`make test-triton`). The interpreter rounds fp32 to bf16 towards zero
where a GPU rounds to nearest, so bf16 is compared loosely there.
"""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.decode import telescoping  # noqa: E402
from avengers.decode.kernels import triton_telescoping  # noqa: E402
from avengers.models.telescoping import TeleLlamaConfig, TeleOptions, TelescopingLlama  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []

THETA = 10000.0
C8 = (2, 4, 6)  # C = 8: merges from t = 1, the first eviction at t = 24


def _rand(*shape, gen, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


def _run_steps(opts, B, H, Hkv, d, dtype, steps, fused=False, start=0):
    """Drive step_core (or fused_qkv_step_core) and the kernel with the same random inputs from
    equal states for `steps` steps from position `start`: the largest output and state differences,
    each relative to the reference's largest magnitude."""
    gen = torch.Generator().manual_seed(0)
    C = opts.cache_size
    tables = telescoping.step_tables(C, opts.fmap, torch.device(DEVICE))
    ref = telescoping.TelescopingState(B, Hkv, C, d, device=DEVICE, dtype=dtype)
    if start:  # a full cache of random slots
        ref.k.copy_(_rand(B, Hkv, C, d, gen=gen, dtype=dtype))
        ref.v.copy_(_rand(B, Hkv, C, d, gen=gen, dtype=dtype))
        ref.log_mass.copy_(_rand(B, Hkv, C, gen=gen, dtype=torch.float32, scale=3.0))
    ker = telescoping.TelescopingState(B, Hkv, C, d, device=DEVICE, dtype=dtype)
    for a, b in zip((ker.k, ker.v, ker.log_mass), (ref.k, ref.v, ref.log_mass)):
        a.copy_(b)
    gains = (_rand(d, gen=gen, dtype=dtype, scale=0.2) + 1, _rand(d, gen=gen, dtype=dtype, scale=0.2) + 1)
    gains = gains if opts.kv_norm else (None, None)
    D = 48
    ln_w, gate_w = _rand(D, gen=gen, dtype=dtype, scale=0.2) + 1, _rand(Hkv, D, gen=gen, dtype=dtype, scale=0.3)
    err = {"out": 0.0, "k": 0.0, "v": 0.0, "log_mass": 0.0}
    for t in range(start, start + steps):
        pos = torch.tensor(t, device=DEVICE)
        rot = telescoping.step_rotation(pos, d, THETA)
        qkv = _rand(B, (H + 2 * Hkv) * d, gen=gen, dtype=dtype)
        q, k, v = telescoping.split_qkv(qkv, Hkv, d)
        state = (pos, ref.k, ref.v, ref.log_mass, tables, opts)
        kstate = (pos, ker.k, ker.v, ker.log_mass, tables, opts)
        linear = opts.gate == "linear"
        if fused:
            h = _rand(B, D, gen=gen, dtype=dtype)
            want = telescoping.fused_qkv_step_core(
                qkv, h, ln_w, 1e-5, gate_w if linear else None, *state, THETA, *gains
            )
            w = triton_telescoping.LinearGate(h, ln_w, 1e-5, gate_w) if linear else None
        else:
            w = _rand(B, 1, Hkv, gen=gen, dtype=torch.float32, scale=2.0) if linear else None
            want = telescoping.step_core(q, k, v, w, *state, THETA, *gains)
            w = w[:, 0] if linear else None
        got = telescoping.kernel_step(q[:, 0], k[:, 0], v[:, 0], w, *kstate, rot, *gains)
        assert got.dtype == want.dtype and got.shape == want.shape
        for name, a, b in (("out", got, want), ("k", ker.k, ref.k), ("v", ker.v, ref.v)):
            err[name] = max(err[name], ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
        live = ref.log_mass > -100  # EMPTY slots hold the sentinel exactly in both
        assert torch.equal(ker.log_mass <= -100, ref.log_mass <= -100), t
        diff = (ker.log_mass - ref.log_mass)[live].abs().max().item() if live.any() else 0.0
        err["log_mass"] = max(err["log_mass"], diff)
    return err


VARIANTS = {
    "documented": dict(gate="linear", kv_norm=True),
    "later": dict(gate="wisq", kv_norm=False, mask_empty=True, softcap=20.0),
    "wisq_norm_softcap": dict(gate="wisq", kv_norm=True, softcap=5.0),
    "linear_masked": dict(gate="linear", kv_norm=False, mask_empty=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_kernel_matches_step_core_fp32(variant, heads):
    """From an empty cache through merges of EMPTY slots and the evictions from t = 24."""
    opts = TeleOptions(8, C8, **VARIANTS[variant])
    err = _run_steps(opts, 2, *heads, 16, torch.float32, 34)
    assert max(err.values()) < 2e-5, err


@pytest.mark.parametrize("gate", ["linear", "wisq"])
def test_fused_qkv_kernel_matches_fused_core(gate):
    """The batch-1 GEMV path's form: q, k, v as views of one QKV output, the linear gate on
    rmsnorm(h) computed in the kernel."""
    opts = TeleOptions(8, C8, gate=gate)
    err = _run_steps(opts, 1, 4, 2, 32, torch.float32, 30, fused=True)
    assert max(err.values()) < 2e-5, err


def test_kernel_pads_a_cache_size_that_is_not_a_power_of_two():
    opts = TeleOptions(12, (3, 6, 9), mask_empty=True)
    err = _run_steps(opts, 2, 4, 2, 16, torch.float32, 20, start=40)  # 48: a drop step
    assert max(err.values()) < 2e-5, err


def test_kernel_in_bf16():
    """bf16 slots and activations, fp32 log-masses: within bf16 rounding of the torch step (the
    interpreter truncates where torch rounds, so its states drift by an ulp or two)."""
    opts = TeleOptions(8, C8, gate="wisq", mask_empty=True)
    err = _run_steps(opts, 2, 4, 2, 16, torch.bfloat16, 30)
    tol = 2e-2 if DEVICE == "cpu" else 1e-2
    assert max(err.values()) < tol, err


def test_fits():
    k = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    w = torch.zeros(1, 2, 128)
    assert triton_telescoping.fits(32, k, w)
    assert not triton_telescoping.fits(32, torch.zeros(1, 2, 128, 48), w)  # d not a power of two
    assert not triton_telescoping.fits(32, torch.zeros(1, 2, 256, 128), w[..., :1].expand(1, 2, 256))  # C * d
    assert not triton_telescoping.fits(32, k.double(), w.double())  # fp64: the torch step


def _tiny(**changes) -> TelescopingLlama:
    kwargs = dict(
        src_vocab_size=64,
        emb_dim=64,
        nheads=4,
        kvheads=2,
        nlayers=2,
        multiple_of=16,
        max_expected_seq_len=128,
        tele_cache_size=8,
    )
    torch.manual_seed(0)
    model = TelescopingLlama(TeleLlamaConfig(**{**kwargs, **changes}))
    model.init_weights()
    with torch.no_grad():  # gains off 1 so the k/v norms are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("variant", ["documented", "later"])
@pytest.mark.parametrize("batch", [1, 2])
def test_model_decodes_on_the_triton_path_as_reference(variant, batch, monkeypatch):
    """Prefill 20 tokens, decode 12 more (through the evictions from t = 24): the `triton` path's
    logits (batch 1: GEMVs + step kernel, batch 2: torch projections + step kernel) equal the
    reference path's, and every step of every layer went through the kernel."""
    from decode_helpers import decode_logits

    changes = {"later": dict(tele_gate="wisq", tele_mask_empty=True, tele_softcap=20.0, tele_kv_norm=False)}
    model = _tiny(**changes.get(variant, {}))
    calls = []
    real = triton_telescoping.telescoping_step
    monkeypatch.setattr(triton_telescoping, "telescoping_step", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 64, (batch, 32), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = decode_logits(model, ids, 20, "reference")
    got = decode_logits(model, ids, 20, "triton")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert len(calls) == 12 * 2


@pytest.mark.skipif(DEVICE != "cuda", reason="the product shape on a GPU")
@pytest.mark.parametrize("start", [0, 1900], ids=["from_empty", "through_eviction"])
def test_kernel_matches_step_core_at_tele128_shape_cuda(start):
    """tele128_llama3_1.8b's layer: d 64, 32 heads over 2 KV heads, C 128 (first eviction at
    t = 1920), bf16 slots with fp32 log-masses, the documented linear gate with k/v norms."""
    from avengers.models import get_model_spec

    cfg = get_model_spec("tele128_llama3_1.8b").config
    opts = cfg.tele_options()
    d = cfg.emb_dim // cfg.nheads
    err = _run_steps(opts, 1, cfg.nheads, cfg.kvheads, d, torch.bfloat16, 64, fused=True, start=start)
    assert max(err.values()) < 1e-2, err
