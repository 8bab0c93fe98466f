"""The chunked SSD reference against the plain sequential recurrence (float64), and partial RoPE."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from avengers.models.mamba import kernels as mamba_kernels
from avengers.models.mamba.kernels import REFERENCE, select_kernels
from avengers.models.mamba.ssd import segsum, ssd_chunked, ssd_sequential
from avengers.ops.rope import rope_cos_sin, rotate_half


def _inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64, generator=gen)
    x = torch.randn(b, l, h, p, **kw)
    dt = torch.rand(b, l, h, **kw) * 0.5 + 0.01
    A = -(torch.rand(h, **kw) * 3 + 0.1)
    B, C = torch.randn(b, l, g, n, **kw), torch.randn(b, l, g, n, **kw)
    D = torch.randn(h, **kw)
    state0 = torch.randn(b, h, p, n, **kw)
    return x, dt, A, B, C, D, state0


def test_segsum_matches_definition():
    a = torch.randn(6, dtype=torch.float64)
    s = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[j + 1 : i + 1].sum() if i >= j else -math.inf
            assert s[i, j].item() == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential(chunk_size, with_state):
    x, dt, A, B, C, D, state0 = _inputs()  # l = 37: never a multiple of the chunk (except 1)
    init = state0 if with_state else None
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, D, initial_state=init)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=init)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_chunked_splits_compose():
    """Running two halves with the state handed over equals running the whole sequence."""
    x, dt, A, B, C, D, _ = _inputs(l=40)
    y, final = ssd_chunked(x, dt, A, B, C, 8, D=D)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8, D=D)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, final, rtol=1e-10, atol=1e-10)


def test_sequential_is_the_recurrence():
    """One hand-written step of h_t = exp(dt A) h_{t-1} + dt x B^T, y = h C + D x (groups expanded)."""
    x, dt, A, B, C, D, state0 = _inputs(b=1, l=1, h=2, p=2, g=1, n=3)
    y, final = ssd_sequential(x, dt, A, B, C, D, initial_state=state0)
    for hh in range(2):
        h_new = math.exp(dt[0, 0, hh] * A[hh]) * state0[0, hh] + dt[0, 0, hh] * torch.outer(x[0, 0, hh], B[0, 0, 0])
        torch.testing.assert_close(final[0, hh], h_new)
        torch.testing.assert_close(y[0, 0, hh], h_new @ C[0, 0, 0] + D[hh] * x[0, 0, hh])


def test_reference_ops_bf16_inputs_compute_in_fp32():
    x, dt, A, B, C, D, _ = _inputs(l=20)
    raw_dt = torch.randn_like(dt)
    bias = torch.zeros(x.shape[2], dtype=torch.float64)
    y32, _ = REFERENCE.ssd(x.float(), raw_dt.float(), A.float(), B.float(), C.float(), 8, D.float(), bias.float())
    y16, final = REFERENCE.ssd(
        x.bfloat16(),
        raw_dt.bfloat16(),
        A.float(),
        B.bfloat16(),
        C.bfloat16(),
        8,
        D.float(),
        bias.float(),
        return_final=True,
    )
    assert y16.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_reference_step_applies_softplus_and_bias():
    x, dt, A, B, C, D, state0 = _inputs(l=1)
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(dt[:, 0].shape, dtype=torch.float64, generator=gen)
    bias = torch.randn(dt.shape[-1], dtype=torch.float64, generator=gen)
    s_ref = state0.clone()
    y = REFERENCE.ssd_step(s_ref, x[:, 0], raw, A, B[:, 0], C[:, 0], D, bias)
    y_seq, s_seq = ssd_sequential(x, F.softplus(raw + bias).unsqueeze(1), A, B, C, D, initial_state=state0)
    torch.testing.assert_close(y, y_seq[:, 0], rtol=1e-12, atol=1e-12)  # fp64 throughout, dt included
    torch.testing.assert_close(s_ref, s_seq, rtol=1e-12, atol=1e-12)


def test_kernel_selection():
    assert select_kernels(torch.device("cpu")).name == "reference"
    assert select_kernels(torch.device("cpu"), "reference").name == "reference"
    with pytest.raises(ValueError, match="needs CUDA"):
        select_kernels(torch.device("cpu"), "mamba_ssm")
    with pytest.raises(ValueError, match="expected one of"):
        select_kernels(torch.device("cpu"), "triton")


def test_missing_mamba_ssm_on_cuda_warns_once_and_falls_back():
    try:
        import mamba_ssm  # noqa: F401

        pytest.skip("mamba_ssm is importable here")
    except ImportError:
        pass
    mamba_kernels._mamba_ssm_kernels.cache_clear()
    cuda = torch.device("cuda")  # selection only: no CUDA call is made
    with pytest.warns(UserWarning, match="mamba_ssm is not importable"):
        assert select_kernels(cuda).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernels(cuda).name == "reference"  # no second warning
    with pytest.raises(RuntimeError, match="cannot be imported"):
        select_kernels(cuda, "mamba_ssm")


def test_partial_rotary_matches_complex_rotation():
    """First r channels rotate as pairs (i, i + r/2) by position * base^(-2i/r); the rest pass through."""
    T, H, d, r = 5, 2, 8, 4
    x = torch.randn(1, T, H, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T), r, 10000.0)
    out = rotate_half(x, cos, sin)
    for t in range(T):
        for i in range(r // 2):
            angle = t * 10000.0 ** (-2 * i / r)
            z = torch.complex(x[0, t, :, i], x[0, t, :, i + r // 2]) * complex(math.cos(angle), math.sin(angle))
            torch.testing.assert_close(out[0, t, :, i], z.real, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out[0, t, :, i + r // 2], z.imag, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., r:], x[..., r:])
    with pytest.raises(ValueError, match="exceeds head_dim"):
        rotate_half(x, *rope_cos_sin(torch.arange(T), 10))
