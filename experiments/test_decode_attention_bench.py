"""benchmarks/gpu_decode_attention.py's fixed-configuration split-K attention (the autotuner
bypassed) computes the reference attention for every split count and key tile it sweeps.
On CUDA or Triton's CPU interpreter (`make test-triton`; fp32 there)."""

import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_decode_attention  # noqa: E402

from avengers.decode.attention import decode_attention_reference  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("nsplit,block", [(1, 64), (3, 32), (16, 64), (4, 128)])
def test_fixed_config_matches_reference(nsplit, block):
    B, H, Hkv, S, d, length = 1, 4, 2, 320, 32, 300
    gen = torch.Generator().manual_seed(nsplit * block)
    q = torch.randn(B, H, d, generator=gen).to(DEVICE)
    k, v = torch.randn(2, B, Hkv, S, d, generator=gen).to(DEVICE)
    call = gpu_decode_attention.attention_call(q, k, v, torch.tensor(length, device=DEVICE), nsplit, block, 4, 2)
    assert call["split"] % block == 0 and call["nsplit"] * call["split"] >= S
    call["partial"]()
    call["merge"]()
    want = decode_attention_reference(q, k, v, length)
    torch.testing.assert_close(call["out"], want, rtol=1e-4, atol=1e-4)
