"""A pure Mamba-2 model under FSDP2 (one gloo process): no block hands back its own input, so FSDP2's
"returned a view tensor ... wrong gradients" warning stays silent, and gradients equal the plain model's."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from avengers.models import get_model_spec
from avengers.models.mamba.kernels import REFERENCE
from avengers.train.parallel import parallelize


def test_first_block_residual_is_not_its_input():
    block = get_model_spec("mamba2_tiny").build().backbone.layers[0]
    x = torch.randn(2, 8, 64)
    _, residual = block(x, None)
    assert residual.data_ptr() != x.data_ptr()
    torch.testing.assert_close(residual, x)
    _, res = REFERENCE.add_rmsnorm(x, None, torch.ones(64), 1e-5, False)
    assert res.data_ptr() != x.data_ptr() and torch.equal(res, x)


def test_fsdp2_pure_mamba2_trains_without_the_view_warning_and_with_equal_gradients():
    spec = get_model_spec("mamba2_tiny")
    torch.manual_seed(0)
    plain = spec.build()
    sharded = copy.deepcopy(plain)
    ids = torch.randint(0, spec.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallelize(sharded, spec.block_types, init_device_mesh("cpu", (1,), mesh_dim_names=("shard",)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            F.cross_entropy(sharded(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        assert not [str(w.message) for w in caught if "view tensor" in str(w.message)]
        F.cross_entropy(plain(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_fsdp2_mixed_precision_keeps_the_residual_stream_fp32(checkpointed):
    """FSDP2's bf16 policy casts block inputs by default; Mamba blocks opt out, so the second block
    receives the fp32 residual that residual_in_fp32 asks for (the hidden state stays bf16)."""
    spec = get_model_spec("mamba2_tiny")
    torch.manual_seed(0)
    model = spec.build()
    model.init_weights()
    ids = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
        parallelize(model, spec.block_types, mesh, activation_checkpointing=checkpointed, mixed_precision=True)
        seen = []
        model.backbone.layers[1].register_forward_pre_hook(lambda _, args: seen.append([a.dtype for a in args]))
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        assert seen[0] == [torch.bfloat16, torch.float32]
    finally:
        dist.destroy_process_group()


def test_one_rank_world_is_one_fsdp2_unit_gathered_from_forward_to_backward():
    """On one rank the root is the only FSDP2 unit (per-block units would only add hooks, casts and
    copies per block), and its parameters stay gathered (plain tensors) from forward to backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    spec = get_model_spec("mamba2_tiny")
    model = spec.build()
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallelize(model, spec.block_types, init_device_mesh("cpu", (1,), mesh_dim_names=("shard",)))
        assert [name for name, m in model.named_modules() if isinstance(m, FSDPModule)] == [""]
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        blocks = model.backbone.layers
        assert not any(isinstance(p, DTensor) for b in blocks for p in b.parameters())
        loss.backward()
        assert all(isinstance(p, DTensor) for b in blocks for p in b.parameters())
    finally:
        dist.destroy_process_group()


def test_fsdp2_units_per_block_only_where_ranks_communicate():
    """One rank has nothing to overlap: the root is its only FSDP2 unit (the test above). More ranks
    shard every block (the 2-process runs in tests/train)."""
    from types import SimpleNamespace

    from avengers.train.parallel import unit_per_block

    assert [unit_per_block(SimpleNamespace(size=lambda n=n: n)) for n in (1, 2, 8)] == [False, True, True]
    assert not unit_per_block(None)
