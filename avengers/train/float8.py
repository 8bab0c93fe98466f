"""float8 training (`--float8`): the blocks' linear layers run their matmuls in fp8 with dynamic
tensorwise scaling, through torchao's Float8Linear, as torchtitan offers. Weights, gradients and
the optimizer stay in their usual precision; the LM head, the embeddings and layers whose
dimensions fp8 matmuls cannot take (not multiples of 16, e.g. a telescoping gate) stay in bf16.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FLOAT8_FAMILIES = ("llama", "telescoping")


def float8_unavailable_reason(family: str, device: torch.device) -> str | None:
    """Why --float8 cannot train this family on this device (None: it can)."""
    if family not in FLOAT8_FAMILIES:
        return f"--float8 supports the {' and '.join(FLOAT8_FAMILIES)} families, not {family!r}"
    if device.type != "cuda":
        return f"--float8 needs a CUDA GPU with fp8 tensor cores (sm_89+: L4, L40, H100, H200), got {device}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"--float8 needs fp8 tensor cores (sm_89+: L4, L40, H100, H200); {name} has none"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "--float8 needs torchao: pip install torchao (requirements-gpu.txt)"
    return None


def _fp8_shaped(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_blocks_to_float8(model: nn.Module, blocks: list[nn.Module]) -> int:
    """Swap every fp8-shaped nn.Linear inside `blocks` for torchao's Float8Linear (in place, before
    sharding and compile); returns how many were converted."""
    from torchao.float8 import convert_to_float8_training

    converted = 0
    for block in blocks:

        def keep(module: nn.Module, fqn: str) -> bool:
            nonlocal converted
            take = _fp8_shaped(module)
            converted += take
            return take

        convert_to_float8_training(block, module_filter_fn=keep)
    log.info("float8: %d linear layers of %d blocks run fp8 matmuls", converted, len(blocks))
    return converted
