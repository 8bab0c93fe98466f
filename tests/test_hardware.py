"""Device figures by name: the roofline and MFU denominators."""

import pytest
import torch

from avengers.hardware import device_spec, measure_copy_bandwidth, spec_for_name


@pytest.mark.parametrize(
    "name,flops,bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
        ("NVIDIA H100 PCIe", 756e12, 2.0e12),
        ("NVIDIA H100 NVL", 835e12, 3.9e12),
        ("NVIDIA H200", 989e12, 4.8e12),
        ("NVIDIA GH200 480GB", 989e12, 4.0e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
        ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
        ("Some Future GPU", None, None),
    ],
)
def test_the_most_specific_name_wins(name, flops, bandwidth):
    spec = spec_for_name(name)
    assert (spec.bf16_flops, spec.bandwidth) == (flops, bandwidth)


def test_cpu_has_no_figures_and_a_copy_can_be_measured():
    assert device_spec("cpu").bandwidth is None and device_spec("cpu").bf16_flops is None
    assert measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 22, repeats=2) > 1e7  # > 10 MB/s
