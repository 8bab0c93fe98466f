"""The persistent Llama decode-block kernel (triton_block.py) against the torch functions.

Runs on CUDA (marked gpu; one program per SM, grid barriers live), or on CPU through Triton's
interpreter when triton is installed and TRITON_INTERPRET=1 is set (`make test-triton`; fp32, and
a grid of one program there, since the interpreter runs programs one after another).
"""

import pytest
import torch
from triton_helpers import assert_fused_decode_matches_full_forward, assert_graph_decode_matches_eager, triton_device

DEVICE = triton_device()

from avengers.inference import llama_compiled, triton_block  # noqa: E402
from avengers.inference.attention import decode_attention_reference  # noqa: E402
from avengers.inference.kv_cache import KVState  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


def _rand(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def _block_weights(D=256, H=8, Hkv=4, d=32, hidden=96):
    return dict(
        ln_w=_rand(D, seed=6) + 1,
        qkv_w=_rand((H + 2 * Hkv) * d, D, seed=8, scale=D**-0.5),
        dense_w=_rand(D, H * d, seed=11, scale=0.05),
        ff_ln_w=_rand(D, seed=7) + 1,
        wg1_w=_rand(2 * hidden, D, seed=12, scale=0.06),
        w2_w=_rand(D, hidden, seed=13, scale=0.1),
    )


@pytest.mark.parametrize("B,S,pos,splits", [(1, 16, 5, None), (2, 200, 130, 4)])
def test_persistent_block_matches_the_torch_functions(B, S, pos, splits):
    """Output and both caches equal decode_pre + write_at + attention + decode_post (4 splits, the last
    one empty, in the second case; positions past `pos` hold garbage the kernel must not read)."""
    D, H, Hkv, d, hidden = 256, 8, 4, 32, 96
    w = _block_weights(D, H, Hkv, d, hidden)
    h = _rand(B, 1, D, seed=5)
    angles = _rand(H + Hkv, d // 2, seed=9)
    cos, sin = angles.cos() * 0.3, angles.sin() * 0.3  # the query scale rides on cos/sin
    got_state, ref_state = KVState(B, Hkv, S, d, device=DEVICE), KVState(B, Hkv, S, d, device=DEVICE)
    for s in (got_state, ref_state):
        s.k.copy_(_rand(B, Hkv, S, d, seed=20))
        s.v.copy_(_rand(B, Hkv, S, d, seed=21))
    position, length = torch.tensor(pos, device=DEVICE), torch.tensor(pos + 1, device=DEVICE)
    out = triton_block.decode_block(
        h,
        w["ln_w"],
        1e-5,
        w["qkv_w"],
        cos,
        sin,
        H,
        Hkv,
        d,
        got_state,
        position,
        length,
        w["dense_w"],
        w["ff_ln_w"],
        1e-5,
        w["wg1_w"],
        w["w2_w"],
        hidden,
        num_splits=splits,
    )
    q, k, v = llama_compiled.decode_pre(h, w["ln_w"], 1e-5, w["qkv_w"], cos, sin, H, Hkv, d)
    ref_state.write_at(k, v, position)
    attn = decode_attention_reference(q, ref_state.k, ref_state.v, pos + 1, scale=1.0).reshape(B, 1, H * d)
    ref = llama_compiled.decode_post(h, attn, w["dense_w"], w["ff_ln_w"], 1e-5, w["wg1_w"], w["w2_w"], hidden)
    torch.testing.assert_close(got_state.k, ref_state.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state.v, ref_state.v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_persistent_block_rejects_mismatched_weights():
    w = _block_weights()
    state = KVState(1, 4, 16, 32, device=DEVICE)
    cos = sin = torch.zeros(12, 16, device=DEVICE)
    pos = torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="hidden=97"):
        triton_block.decode_block(
            _rand(1, 1, 256),
            w["ln_w"],
            1e-5,
            w["qkv_w"],
            cos,
            sin,
            8,
            4,
            32,
            state,
            pos,
            pos + 1,
            w["dense_w"],
            w["ff_ln_w"],
            1e-5,
            w["wg1_w"],
            w["w2_w"],
            97,
        )


def test_llama_decode_with_persistent_blocks_matches_full_forward(monkeypatch, tiny_on_device):
    calls = []
    real = triton_block.decode_block
    monkeypatch.setattr(triton_block, "decode_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec, model = tiny_on_device
    assert_fused_decode_matches_full_forward(
        model, spec, "persistent", DEVICE, batch=llama_compiled.GEMV_STEP_MAX_BATCH
    )
    assert len(calls) == 4 * spec.config.nlayers  # every decode block was one persistent kernel


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("stamps", [False, True])
def test_persistent_decode_in_a_cuda_graph_matches_eager_decode(tiny_on_device, stamps, monkeypatch):
    """Replayed steps, with and without the phase timer (which must not change the output and must
    record, per program, its phase ends in order)."""
    programs = triton_block._programs(torch.device(DEVICE))
    buf = torch.zeros(programs, 16, dtype=torch.int64, device=DEVICE) if stamps else None
    monkeypatch.setattr(triton_block, "STAMPS", buf)
    spec, model = tiny_on_device
    assert_graph_decode_matches_eager(model, spec, "persistent", DEVICE)
    if stamps:
        t = buf[:, :7].cpu()  # kernel start and the ends of its six phase steps (incl. the attention wait)
        assert (t > 0).all() and (t.diff(dim=1) >= 0).all()
