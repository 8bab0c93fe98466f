"""experiments/gpu_causal_conv_tiles.py: every candidate tile of the forward and backward computes the
reference's outputs and gradients (fp32, a small layer), so the sweep's pick is a correct one. On CUDA
or Triton's CPU interpreter (`make test-triton`)."""

import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_causal_conv_tiles as sweep  # noqa: E402

from avengers.models.mamba import causal_conv_triton as cc  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("form,tiles", [("forward", t) for t in sweep.FWD] + [("backward", t) for t in sweep.BWD])
def test_every_candidate_matches_the_reference(form, tiles):
    x, w, b, grad = sweep.layer_inputs(2, L=37, d_inner=32, bc=16, nheads=2, device=DEVICE, dtype=torch.float32)
    ref_out, ref_grads = sweep.reference(x, w, b, grad)
    fn = sweep.run_form(form, cc.Tiles(*tiles), x, w, b, grad)
    assert sweep.errors(form, fn(), ref_out, ref_grads) < 1e-5


def test_the_products_tiles_are_candidates():
    assert tuple(vars(cc.FWD_TILES).values()) in sweep.FWD
    assert tuple(vars(cc.BWD_TILES).values()) in sweep.BWD
