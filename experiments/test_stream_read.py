"""benchmarks/gpu_stream_read.py's read kernel: its three modes compute what they claim (fp32; the
benchmark itself runs bf16 on a GPU). On CUDA or Triton's CPU interpreter (`make test-triton`)."""

import sys
from pathlib import Path

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_stream_read  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("mode,rows_per_tile", [("read", 4), ("gemv", 4), ("mma", 16)])
def test_read_kernel_modes(mode, rows_per_tile):
    K, tiles, programs = 64, 5, 3  # programs walk tiles pid, pid + 3, ...: one program gets two
    gen = torch.Generator().manual_seed(0)
    w, v = torch.randn(tiles * rows_per_tile * K, generator=gen), torch.randn(K, generator=gen)
    w, v = w.to(DEVICE), v.to(DEVICE)
    out = torch.zeros(tiles * rows_per_tile, device=DEVICE)
    gpu_stream_read._read_kernel[(programs,)](
        w, v, out, tiles, TILE=rows_per_tile * K, STAGES=2, GDC=False, MODE=mode, K=K, KC=32
    )
    if mode == "read":
        torch.testing.assert_close(out[:programs].sum(), w.sum(), rtol=1e-5, atol=1e-4)
    else:
        atol = 1e-2 if DEVICE == "cuda" and mode == "mma" else 1e-4  # tf32 on a GPU
        torch.testing.assert_close(out, w.view(-1, K) @ v, rtol=1e-3, atol=atol)
