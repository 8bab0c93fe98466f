"""Where the Triton kernel tests run: CUDA, or Triton's CPU interpreter (`make test-triton`)."""

from __future__ import annotations

import os

import pytest
import torch


def triton_device() -> str:
    """'cuda' or 'cpu' (interpreter); skips the calling test module when neither can run Triton.

    Call at module level, before importing the kernels (they import triton)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 for Triton's CPU interpreter", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() else "cpu"
