"""Fixtures shared by several test files."""

import pytest
import torch

from avengers.models.registry import get_model_spec


@pytest.fixture(scope="module")
def tiny():
    """(spec, model) of llama3_tiny with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    spec = get_model_spec("llama3_tiny")
    model = spec.build()
    model.init_weights()
    return spec, model.eval()
