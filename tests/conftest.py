"""Fixtures shared by several test files; slurm-marked tests run only when selected (`-m slurm`)."""

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


def pytest_collection_modifyitems(config, items):
    if "slurm" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="starts a local Slurm cluster: make test-slurm (pytest -m slurm)")
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(skip)
