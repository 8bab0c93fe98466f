"""The training FLOPs per token behind MFU (ModelSpec.flops_per_token) against torch's FLOP counter
on a forward + backward of tiny models: matmuls, attention and the Mamba-2 SSD all counted."""

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from avengers.models import get_model_spec
from avengers.models.mamba import matmul_params, ssd_flops_per_token

aten = torch.ops.aten
B, T = 2, 128


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the CUDA attention kernels; on the CPU SDPA runs its own flash op
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def _count(spec, seq_len: int = T) -> dict:
    torch.manual_seed(0)
    model = spec.build("cpu")
    model.init_weights()
    ids = torch.randint(0, spec.vocab_size, (B, seq_len))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(ids, labels=torch.roll(ids, -1, 1)).backward()
    return counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("variant", ["llama3_tiny", "tele_tiny"])
def test_attention_models_count_matmuls_and_attention(variant):
    """Attention's backward counts 2.5x its forward here (the scores are recomputed) and 2x in the
    formula (3x forward overall, as every matmul): 1% of the total at this size."""
    spec = get_model_spec(variant)
    counted = sum(_count(spec).values())
    assert spec.flops_per_token(T) * B * T == pytest.approx(counted, rel=0.02)


def test_mamba2_counts_projections_and_the_ssd():
    """Projections exactly (the depthwise conv aside, which the counter mis-sizes); the chunked SSD
    within 10% over four chunks, with one B/C group per head: the reference expands groups to heads
    (the kernels do not) and passes states between chunks as a full chunk x chunk matrix (mamba_ssm
    scans), work that grows with the number of chunks."""
    spec = get_model_spec("mamba2_tiny").replace(ngroups=8)
    cfg = spec.config
    seq_len = 4 * cfg.chunk_size
    counts = _count(spec, seq_len)
    conv = cfg.conv_dim * cfg.d_conv
    assert counts[aten.mm] == pytest.approx(6 * (matmul_params(cfg) - conv) * B * seq_len, rel=0.01)
    ssd = ssd_flops_per_token(cfg, seq_len) * cfg.n_layer * B * seq_len
    assert counts[aten.bmm] == pytest.approx(ssd, rel=0.1)
