"""The Mamba-2 family's decode kernels (triton_mamba_step.py) against torch: in_proj with the conv
step in its epilogue, the standalone conv step, a hybrid attention layer's RoPE + cache write.

Runs on CUDA (marked gpu), or on CPU through Triton's interpreter (`make test-triton`; fp32 only).
The model-level decode tests of these kernels are in test_triton_gemv.py (the GEMV steps).
"""

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import few_gemv_tiles, triton_device

DEVICE = triton_device()

from avengers.decode.kernels import triton_mamba_step  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.fixture(autouse=True, scope="module")
def few_tiles():
    with few_gemv_tiles(DEVICE, triton_mamba_step._in_proj_conv_kernel):
        yield


def _rand(*shape, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


@pytest.mark.parametrize("B", [1, 3])
def test_in_proj_conv_matches_in_proj_then_the_conv_step(B):
    """Mamba-2's in_proj GEMV with the conv step in its epilogue: the z and dt columns are the
    GEMV's, the x|B|C columns silu(conv) continuing the window, and the window shifted in place
    exactly as decode.mamba.conv_step shifts it (over three steps)."""
    from avengers.decode.kernels.triton_mamba_step import in_proj_conv
    from avengers.decode.mamba import conv_step

    K, z_cols, C, dt_cols, width = 72, 24, 37, 5, 4
    N = z_cols + C + dt_cols
    w, g = _rand(N, K, seed=3, scale=K**-0.5), _rand(K, seed=2) + 1
    conv_w, conv_b = _rand(C, 1, width, seed=6, scale=0.5), _rand(C, seed=7)
    window = _rand(B, C, width, seed=8)
    want_window = window.clone()
    for step in range(3):
        h = _rand(B, K, seed=10 + step)
        proj = F.linear(F.rms_norm(h, (K,), g, 1e-5), w)
        conv, _ = conv_step(want_window, proj[:, None, z_cols : z_cols + C], conv_w, conv_b, torch.zeros(1))
        want = torch.cat([proj[:, :z_cols], conv[:, 0], proj[:, z_cols + C :]], dim=-1)
        out = in_proj_conv(h, w, g, 1e-5, window, conv_w, conv_b, conv_start=z_cols, out_dtype=h.dtype)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(window, want_window, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("B", [1, 5])
def test_conv_step_kernel_matches_the_torch_conv_step(B):
    """The standalone conv step (batches above the GEMV's): silu(conv) and the shifted windows equal
    decode.mamba.conv_step's over three steps, for a channel count no block size divides."""
    from avengers.decode.kernels.triton_mamba_step import conv_step
    from avengers.decode.mamba import conv_step as torch_conv_step

    C, width = 300, 4
    conv_w, conv_b = _rand(C, 1, width, seed=6, scale=0.5), _rand(C, seed=7)
    window = _rand(B, C, width, seed=8)
    want_window = window.clone()
    for step in range(3):
        xbc = _rand(B, 2 * C, seed=20 + step)[:, :C]  # a column slice of a wider row, as in_proj's
        want, _ = torch_conv_step(want_window, xbc[:, None], conv_w, conv_b, torch.zeros(1))
        torch.testing.assert_close(conv_step(window, xbc, conv_w, conv_b), want[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(window, want_window, atol=0, rtol=0)


@pytest.mark.parametrize("rotary", [0, 8, 16])
def test_rope_write_matches_rotate_half_and_the_cache_write(rotary):
    """A hybrid attention layer's q/k rotation (rotate_half over the first `rotary` channels, none
    with 0) and k/v cache write at a device position, against ops.rope and KVState.write_at."""
    from avengers.decode.cache import KVState
    from avengers.decode.kernels.triton_mamba_step import rope_write
    from avengers.ops.rope import rope_cos_sin, rotate_half

    B, H, Hkv, d, S = 2, 4, 2, 16, 64
    qkv = _rand(B, (H + 2 * Hkv) * d, seed=9)
    position = torch.tensor(37, device=DEVICE)
    cos, sin = rope_cos_sin(position.view(1), rotary, 10000.0) if rotary else (None, None)
    state, want_state = KVState(B, Hkv, S, d, device=DEVICE), KVState(B, Hkv, S, d, device=DEVICE)
    q, k, v = qkv.view(B, 1, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=2)
    if rotary:
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    want_state.write_at(k.transpose(1, 2), v.transpose(1, 2), position)
    got = rope_write(qkv, cos, sin, position, H, state)
    torch.testing.assert_close(got, q[:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.k, want_state.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state.v, want_state.v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="rope_write"):
        rope_write(qkv[:, :-1], cos, sin, position, H, state)


def test_in_proj_conv_rejects_a_window_outside_the_columns():
    from avengers.decode.kernels.triton_mamba_step import in_proj_conv

    with pytest.raises(ValueError, match="in_proj_conv"):
        in_proj_conv(
            _rand(1, 16), _rand(8, 16), _rand(16), 1e-5, _rand(1, 6, 4), _rand(6, 1, 4), _rand(6), 4, torch.float32
        )


def test_conv_step_rejects_a_conv_without_bias():
    from avengers.decode.kernels.triton_mamba_step import conv_step

    with pytest.raises(ValueError, match="conv_step.*bias"):
        conv_step(_rand(1, 6, 4), _rand(1, 6), _rand(6, 1, 4), None)
