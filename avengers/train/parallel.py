"""Process group, device mesh, and the per-block transforms: activation checkpointing, compile, FSDP2.

Order per block (as in torchtitan): checkpoint wrapper -> compile -> fully_shard; then the root.
Blocks are every module instance of `spec.block_types` that is not inside another block, in
module-registration order.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's group (env RANK/WORLD_SIZE) or make a 1-process group; nccl on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is False; use device=cpu or auto")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=60)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, rank=rank, world_size=world, timeout=timeout, device_id=dev if use_cuda else None
            )
        else:
            if world != 1:
                raise RuntimeError(f"WORLD_SIZE={world} without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev)


def build_mesh(strategy: str, world_size: int, device_type: str, shard_size: int | None) -> DeviceMesh:
    """fsdp: 1-D shard mesh; hsdp: (replicate, shard); ddp: (replicate=world, shard=1)."""
    if strategy == "fsdp":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if strategy == "ddp":
        shard = 1
    elif strategy == "hsdp":
        shard = shard_size or world_size
    else:
        raise ValueError(f"sharding_strategy={strategy!r}: expected fsdp, hsdp or ddp")
    if world_size % shard:
        raise ValueError(f"hsdp shard group size {shard} does not divide world size {world_size}")
    return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def shard_group_size(mesh: DeviceMesh) -> int:
    """Ranks a parameter is sharded over: the mesh's "shard" dimension (1-D meshes: all of it)."""
    return mesh["shard"].size() if mesh.mesh_dim_names and "shard" in mesh.mesh_dim_names else mesh.size()


def selective_ac_pattern(num_blocks: int, p: float | str) -> list[bool]:
    """fms-fsdp's spread: block i (1-based) is checkpointed when i*p >= cutoff (0.5, then +1 per hit)."""
    frac = Fraction(str(p)).limit_denominator(1_000_000)
    cutoff = Fraction(1, 2)
    pattern = []
    for i in range(1, num_blocks + 1):
        hit = i * frac >= cutoff
        if hit:
            cutoff += 1
        pattern.append(hit)
    return pattern


def find_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, block_types) and not any(name.startswith(b + ".") for b, _ in blocks):
            blocks.append((name, module))
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no module of the block types {block_types}")
    return blocks


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _block_kwargs(block: nn.Module, kwargs: dict) -> dict:
    """fully_shard's arguments for one block: a block class with `fsdp_cast_forward_inputs = False`
    gets its inputs in the dtypes the previous block produced (Mamba's fp32 residual stream), not
    cast to the bf16 compute dtype."""
    policy = kwargs.get("mp_policy")
    if policy is None or getattr(type(block), "fsdp_cast_forward_inputs", True):
        return kwargs
    return {**kwargs, "mp_policy": replace(policy, cast_forward_inputs=False)}


def unit_per_block(mesh: DeviceMesh | None) -> bool:
    """Whether each block gets its own FSDP2 unit (else the root is the only one). A world of one
    rank has nothing to communicate, so units per block would overlap nothing: they only add hooks,
    casts and copies per block, host time that sets a small model's step (Mamba-2 at batch 4). Its
    root is then the only unit: one gather per step, one reduction at the end."""
    return mesh is not None and mesh.size() > 1


def parallelize(
    model: nn.Module,
    block_types: tuple[type[nn.Module], ...],
    mesh: DeviceMesh | None,
    activation_checkpointing: bool = False,
    selective: float | str = 1,
    compile_blocks: bool = False,
    mixed_precision: bool = False,
    compile_cache_size_limit: int = 128,
) -> nn.Module:
    """Apply AC, per-block compile and FSDP2 in place; returns the (same) root module."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = find_blocks(model, block_types)
    pattern = selective_ac_pattern(len(blocks), selective) if activation_checkpointing else [False] * len(blocks)
    if compile_blocks:
        dyn = torch._dynamo.config  # identical blocks share one graph; big models need a larger total
        name = (
            "accumulated_recompile_limit"
            if hasattr(dyn, "accumulated_recompile_limit")
            else "accumulated_cache_size_limit"
        )
        setattr(dyn, name, max(getattr(dyn, name), compile_cache_size_limit))
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # A shard group of one rank (one GPU, ddp) holds whole parameters: resharding after forward would
    # free only their bf16 copies and cost a second gather (casts and copies) per block in backward.
    one_rank = mesh is not None and shard_group_size(mesh) == 1
    per_block = unit_per_block(mesh)
    for i, ((name, block), ac) in enumerate(zip(blocks, pattern)):
        shard_kwargs = _block_kwargs(block, kwargs)  # read from the block's own class, before any wrapper
        if ac:
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            _set_submodule(model, name, block)
        if compile_blocks:
            block.compile()
        if per_block:
            # The last block's parameters are needed again first in backward: keep them gathered.
            reshard = not one_rank and i < len(blocks) - 1
            fully_shard(block, reshard_after_forward=reshard, **shard_kwargs)
    if mesh is not None:
        fully_shard(model, **kwargs)
    log.info(
        "parallelize: %d blocks%s, %d checkpointed, compile=%s, mixed_precision=%s",
        len(blocks),
        " in the root's FSDP2 unit (one rank)" if mesh is not None and not per_block else "",
        sum(pattern),
        compile_blocks,
        mixed_precision,
    )
    return model
