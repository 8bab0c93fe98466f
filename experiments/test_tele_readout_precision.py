"""experiments/gpu_tele_readout_precision.py's variant kernel computes the product read-out (tf32x3;
the interpreter's tf32 is fp32). On CUDA or Triton's CPU interpreter (`make test-triton`)."""

import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_tele_readout_precision as exp  # noqa: E402

from avengers.decode.kernels.triton_tele_readout import slot_readout  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("v_early", [False, True])
def test_variant_kernel_matches_the_product_read_out(v_early):
    q, K, V, W, gains = exp.inputs(2, DEVICE, torch.float32)
    ref = slot_readout(q, K, V, W, exp._Opts, *gains)
    torch.testing.assert_close(exp.variant(q, K, V, gains, "tf32x3", v_early, 4), ref, atol=1e-5, rtol=1e-5)
