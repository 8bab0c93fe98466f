"""experiments/gpu_ssm_state_update.py's kernel against the pure-torch decode state update
(ref_ssd_step): ragged head dim and state size (masked tiles), grouped B/C, strided inputs, an
fp32 and a bf16 state, every tile height. On CUDA or Triton's CPU interpreter (`make test-triton`)."""

import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_ssm_state_update as exp  # noqa: E402

from avengers.models.mamba.kernels import ref_ssd_step  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


class _Shape:  # a Mamba-2 layer's SSM dimensions, small and not powers of two
    nheads, headdim, d_state, ngroups = 4, 12, 10, 2


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_p", [4, 16])
def test_matches_the_reference_update(state_dtype, block_p):
    states, inputs = exp.layer_inputs(3, _Shape, state_dtype, DEVICE)
    assert not inputs[0].is_contiguous()  # x is a view into the conv output row
    expect_state, got_state = states[0].clone(), states[0].clone()
    expect_y = ref_ssd_step(expect_state, *inputs)
    got_y = exp.state_update(got_state, *inputs, block_p=block_p, num_warps=1)
    tol = dict(atol=2e-2, rtol=2e-2) if state_dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state.float(), expect_state.float(), **tol)
    torch.testing.assert_close(got_y.float(), expect_y.float(), atol=2e-2, rtol=2e-2)  # y is bf16 (x's dtype)
    assert got_y.dtype == inputs[0].dtype and got_state.dtype == state_dtype


def test_without_skip_connection_and_large_dt():
    states, (x, dt, A, B, C, D, dt_bias) = exp.layer_inputs(2, _Shape, torch.float32, DEVICE)
    dt = dt + 30  # softplus' linear branch
    expect_state, got_state = states[0].clone(), states[0].clone()
    expect_y = ref_ssd_step(expect_state, x, dt, A, B, C, None, dt_bias)
    got_y = exp.state_update(got_state, x, dt, A, B, C, None, dt_bias, block_p=8, num_warps=1)
    torch.testing.assert_close(got_state, expect_state, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got_y.float(), expect_y.float(), atol=2e-2, rtol=2e-2)
