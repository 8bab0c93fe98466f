"""The Triton decode state update (ssd_step_triton) against the pure-torch one (ref_ssd_step):
ragged head dim and state size (masked tiles), grouped B/C, strided inputs, an fp32 and a bf16
state, several tile heights. On CUDA or Triton's CPU interpreter (`make test-triton`)."""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.models.mamba.kernels import ref_ssd_step  # noqa: E402
from avengers.models.mamba.ssd_step_triton import triton_ssd_step  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


def layer_inputs(batch: int, cfg, state_dtype: torch.dtype, device):
    """A random state and one token's inputs at a layer's shape, laid out as the decode step has
    them (x, B, C are views into one conv output row)."""
    gen = torch.Generator(device=device).manual_seed(0)
    h, p, n, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    state = (torch.randn(batch, h, p, n, device=device, generator=gen) * 0.5).to(state_dtype)
    xbc = torch.randn(batch, h * p + 2 * g * n, device=device, generator=gen, dtype=torch.bfloat16)
    x, B, C = torch.split(xbc, [h * p, g * n, g * n], dim=-1)
    dt = torch.randn(batch, h, device=device, generator=gen, dtype=torch.bfloat16)
    A = -torch.rand(h, device=device, generator=gen) * 4 - 0.5
    D = torch.randn(h, device=device, generator=gen)
    dt_bias = torch.randn(h, device=device, generator=gen) * 0.5
    return state, (x.view(batch, h, p), dt, A, B.view(batch, g, n), C.view(batch, g, n), D, dt_bias)


class _Shape:  # a Mamba-2 layer's SSM dimensions, small and not powers of two
    nheads, headdim, d_state, ngroups = 4, 12, 10, 2


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [dict(block_p=4, num_warps=1), dict(block_p=16, num_warps=1), {}])  # {}: the default
def test_matches_the_reference_update(state_dtype, tile):
    state, inputs = layer_inputs(3, _Shape, state_dtype, DEVICE)
    assert not inputs[0].is_contiguous()  # x is a view into the conv output row
    expect_state, got_state = state.clone(), state.clone()
    expect_y = ref_ssd_step(expect_state, *inputs)
    got_y = triton_ssd_step(got_state, *inputs, **tile)
    tol = dict(atol=2e-2, rtol=2e-2) if state_dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state.float(), expect_state.float(), **tol)
    torch.testing.assert_close(got_y.float(), expect_y.float(), atol=2e-2, rtol=2e-2)  # y is bf16 (x's dtype)
    assert got_y.dtype == inputs[0].dtype and got_state.dtype == state_dtype


def test_without_skip_connection_and_large_dt():
    state, (x, dt, A, B, C, D, dt_bias) = layer_inputs(2, _Shape, torch.float32, DEVICE)
    dt = dt + 30  # softplus' linear branch
    expect_state, got_state = state.clone(), state.clone()
    expect_y = ref_ssd_step(expect_state, x, dt, A, B, C, None, dt_bias)
    got_y = triton_ssd_step(got_state, x, dt, A, B, C, None, dt_bias, block_p=8, num_warps=1)
    torch.testing.assert_close(got_state, expect_state, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got_y.float(), expect_y.float(), atol=2e-2, rtol=2e-2)


@torch.no_grad()
def test_a_model_decodes_its_full_forward_through_it(monkeypatch):
    """mamba2_tiny's decode steps with this kernel as the state update (as on CUDA) give the logits
    of one forward over the same tokens."""
    import dataclasses

    import avengers.models.mamba.model as mamba_model
    from avengers.models.mamba.kernels import REFERENCE
    from avengers.models.registry import get_model_spec

    torch.manual_seed(0)
    model = get_model_spec("mamba2_tiny").build(DEVICE).eval()
    ids = torch.randint(0, 4096, (2, 24), device=DEVICE)
    want = model(ids)
    kernels = dataclasses.replace(REFERENCE, ssd_step=triton_ssd_step)
    monkeypatch.setattr(mamba_model, "select_kernels", lambda device, mode: kernels)
    cache = model.allocate_cache(2, 24)
    got = torch.cat(
        [model(ids[:, :16], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(16, 24)], 1
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
