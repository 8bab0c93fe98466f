"""Mamba-2 and hybrid Mamba-2/attention models in mamba_ssm's layout: config, modules, kernels
(mamba_ssm's Triton kernels on CUDA, the pure-torch reference elsewhere), io and variants."""

import os

# mamba_ssm's kernels are autotuned on their first calls (tens of seconds per shape on a fresh
# process); Triton keeps the choices on disk only when asked, and reads this when mamba_ssm's
# modules are imported (after this package). TRITON_CACHE_AUTOTUNING=0 turns it off.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

from avengers.models.mamba.config import MambaConfig
from avengers.models.mamba.io import from_pretrained, save_pretrained
from avengers.models.mamba.model import Attention, GatedMLP, Mamba2Mixer, MambaBlock, MambaLM, RMSNorm
from avengers.models.mamba.variants import mamba_flops_per_token, matmul_params, ssd_flops_per_token

__all__ = [
    "Attention",
    "GatedMLP",
    "Mamba2Mixer",
    "MambaBlock",
    "MambaConfig",
    "MambaLM",
    "RMSNorm",
    "from_pretrained",
    "mamba_flops_per_token",
    "matmul_params",
    "save_pretrained",
    "ssd_flops_per_token",
]
