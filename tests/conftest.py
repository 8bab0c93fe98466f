"""Fixtures shared by several test files."""

import pytest
import torch

from avengers.models.registry import get_model_spec


def _build_tiny(device="cpu"):
    torch.manual_seed(0)
    spec = get_model_spec("llama3_tiny")
    model = spec.build(device)
    model.init_weights()
    return spec, model.eval()


@pytest.fixture(scope="module")
def tiny():
    """(spec, model) of llama3_tiny with seeded random weights, in eval mode."""
    return _build_tiny()


@pytest.fixture(scope="module")
def tiny_on_device(request):
    """As `tiny`, built on the test module's DEVICE (CPU when it has none)."""
    return _build_tiny(getattr(request.module, "DEVICE", "cpu"))
