"""What one accelerator can do at most: dense bf16 FLOP/s and memory bandwidth, by device name.

Used for training MFU (avengers.train.metrics) and for the decode roofline of the benchmark
(avengers.inference.bench): a step takes at least max(bytes moved / bandwidth, FLOPs / peak).
Figures are the vendors' datasheet numbers (dense, no sparsity). A device missing from the table
has no FLOP peak (MFU unreported); its bandwidth can be measured with `measure_copy_bandwidth`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bf16_flops: float | None  # dense bf16 tensor-core FLOP/s
    bandwidth: float | None  # memory bandwidth, bytes/s


# Matched in order by substring of torch.cuda.get_device_name: specific names before general ones.
_TABLE = (
    ("GB200", 2.5e15, 8.0e12),
    ("B200", 2.25e15, 8.0e12),
    ("B100", 1.75e15, 8.0e12),
    ("GH200", 989e12, 4.0e12),
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    ("H800", 989e12, 3.35e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),  # 40 GB
    ("A800", 312e12, 2.039e12),
    ("L40S", 362e12, 0.864e12),
    ("L40", 181e12, 0.864e12),
    ("A6000", 155e12, 0.768e12),
    ("A10G", 70e12, 0.6e12),
    ("L4", 121e12, 0.3e12),
    ("MI300X", 1307e12, 5.3e12),
    ("MI250X", 383e12, 3.2e12),
)


def spec_for_name(name: str) -> DeviceSpec:
    for key, flops, bandwidth in _TABLE:
        if key in name:
            return DeviceSpec(name, flops, bandwidth)
    return DeviceSpec(name, None, None)


def device_spec(device: torch.device | str) -> DeviceSpec:
    """The table's figures for a CUDA device; a CPU (or an unlisted GPU) has none."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceSpec("cpu", None, None)
    return spec_for_name(torch.cuda.get_device_name(device))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s a device-to-device copy moves (read + write), the best of `repeats`: the achievable
    stream bandwidth where the datasheet figure is unknown."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
