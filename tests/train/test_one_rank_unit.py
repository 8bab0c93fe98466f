"""One rank, one FSDP2 unit: the root alone trains every family exactly as a unit per block did."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from avengers.models.registry import get_model_spec
from avengers.train import parallel


def _loss_and_grads(spec, per_block: bool, monkeypatch) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = spec.build()
    model.init_weights()
    monkeypatch.setattr(parallel, "unit_per_block", lambda mesh: per_block)
    parallel.parallelize(model, spec.block_types, init_device_mesh("cpu", (1,)), mixed_precision=True)
    ids = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    loss = out if out.dim() == 0 else F.cross_entropy(out.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    return units, loss.detach(), [p.grad.full_tensor() for p in model.parameters()]


@pytest.mark.parametrize("name", ["llama3_tiny", "tele_tiny", "hybrid_tiny"])
def test_root_unit_equals_units_per_block_in_bf16_mixed_precision(name, monkeypatch):
    """The per-block units cast each block's inputs to bf16 (Mamba blocks opt out); with the root
    alone nothing does, so this checks no block depended on it: same loss and gradients."""
    spec = get_model_spec(name)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        units, loss, grads = _loss_and_grads(spec, False, monkeypatch)
        block_units, block_loss, block_grads = _loss_and_grads(spec, True, monkeypatch)
    finally:
        dist.destroy_process_group()
    assert units == 1 and block_units > 1
    torch.testing.assert_close(loss, block_loss, rtol=0, atol=0)
    for g, want in zip(grads, block_grads):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)
