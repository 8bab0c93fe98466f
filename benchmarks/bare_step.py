"""The minimal FSDP2 training step the GPU benchmarks time against the trainer (bench_train_gpu.py)
and the experiments profile (experiments/gpu_float8_step.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from avengers.train.parallel import build_mesh, find_blocks


def bare_step(
    spec,
    device: torch.device,
    batch: int,
    seq: int,
    compile_blocks: bool,
    mixed: bool,
    loss_mode: str,
    float8: bool = False,
) -> Callable[[], None]:
    """One training step on one process: fully_shard per block + root (with `mixed`: bf16 params, fp32
    reduce, fp32 master weights), optionally block.compile(), fused AdamW, fixed random tokens. The loss
    is `chunked` (the models' labels= path, what the trainer runs) or `full` (cross-entropy over the
    whole batch's fp32 logits); `float8` converts the blocks' linear layers as the trainer's --float8."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    mesh = build_mesh("fsdp", 1, device.type, None)
    model = spec.build("meta")
    blocks = [block for _, block in find_blocks(model, spec.block_types)]
    if float8:
        from avengers.train.float8 import convert_blocks_to_float8

        convert_blocks_to_float8(model, blocks)
    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if mixed else {}
    for i, block in enumerate(blocks):
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1, **mp)
    fully_shard(model, mesh=mesh, **mp)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda" or None
    )
    x = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> None:
        if loss_mode == "full":
            loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten())
        else:
            loss = model(inputs, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
