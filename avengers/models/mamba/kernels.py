"""The one place that picks Mamba-2 kernels: mamba_ssm's Triton kernels on CUDA, pure torch elsewhere.

On CUDA two ops are ours: the decode state update (ssd_step_triton, about twice as fast as
mamba_ssm's at large batches) and, without the causal-conv1d package, the causal conv.

Every op has a reference implementation here (built on avengers.models.mamba.ssd) with the same
signature, so a model runs the same weights on either path and tests can compare the two.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avengers.models.mamba.conv import ref_causal_conv
from avengers.models.mamba.ssd import ssd_chunked, ssd_step

log = logging.getLogger(__name__)
KERNEL_MODES = ("auto", "mamba_ssm", "reference")


# ---- reference ops -------------------------------------------------------------------------


def _softplus_dt(dt: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """softplus(dt + dt_bias) in at least fp32 (fp64 inputs stay fp64, as in ssd.py)."""
    ct = torch.promote_types(dt.dtype, torch.float32)
    return F.softplus(dt.to(ct) + dt_bias.to(ct))


def ref_ssd(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state=None, return_final=False):
    """dt is raw (before bias and softplus), as mamba_chunk_scan_combined takes it.

    -> (y [b, l, h, p], final state [b, h, p, n] or None unless return_final).
    """
    dt = _softplus_dt(dt, dt_bias)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    return y, (final if return_final else None)


def ref_ssd_step(state, x, dt, A, B, C, D, dt_bias):
    """state [b,h,p,n] updated in place; x [b,h,p]; raw dt [b,h]; B, C [b,g,n] -> y [b,h,p]."""
    return ssd_step(state, x, _softplus_dt(dt, dt_bias), A, B, C, D)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def ref_gated_rmsnorm(y, z, weight, eps, group_size):
    """rmsnorm(y * silu(z)) * weight, normalised over groups of `group_size` channels (mamba_ssm's
    RMSNormGated with norm_before_gate=False; Mamba2 uses one group per B/C group)."""
    gated = (y.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * weight.float()).to(y.dtype)


def ref_add_rmsnorm(x, residual, weight, eps, residual_in_fp32):
    """(rmsnorm(x + residual), x + residual): the pre-norm residual step of mamba_ssm's Block.

    With no residual yet (the first block) the stream starts as a copy of x: a block handing back its
    own input makes FSDP2 warn that in-place use of that output would skip its backward hooks."""
    if residual is None:
        residual = x.to(torch.float32 if residual_in_fp32 else x.dtype, copy=True)
    else:
        residual = x + residual
        if residual_in_fp32:
            residual = residual.float()
    return _rms(residual, weight, eps).to(x.dtype), residual


# ---- mamba_ssm ops (imported only on CUDA) --------------------------------------------------


def _mamba_ssm_ops() -> dict[str, Callable]:
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from avengers.models.mamba.ssd_step_triton import triton_ssd_step as step  # 2x mamba_ssm's at batch 64+

    def ssd(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state=None, return_final=False):
        out = mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            dt_bias=dt_bias,
            initial_states=initial_state,
            dt_softplus=True,
            return_final_states=return_final,
        )
        return out if return_final else (out, None)

    def gated(y, z, weight, eps, group_size):
        return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)

    def add_norm(x, residual, weight, eps, residual_in_fp32):
        if residual is not None and residual_in_fp32 and residual.dtype != torch.float32:
            residual = residual.float()  # a caller handed a bf16 residual: upcast, as the reference does
        out, res = rms_norm_fn(
            x, weight, None, residual=residual, eps=eps, prenorm=True, residual_in_fp32=residual_in_fp32
        )
        if residual is None and (x.dtype == torch.float32 or not residual_in_fp32):
            res = res.clone()  # the kernel hands back x itself here (see ref_add_rmsnorm)
        return out, res

    try:
        from causal_conv1d import causal_conv1d_fn

        def conv(x, weight, bias, silu):
            return causal_conv1d_fn(x, weight.squeeze(1), bias, activation="silu" if silu else None)
    except ImportError:  # our Triton kernel on the same channel-last layout (cuDNN's depthwise is slow)
        from avengers.models.mamba.causal_conv_triton import self_test, triton_causal_conv

        conv = triton_causal_conv if self_test() else ref_causal_conv

    return dict(ssd=ssd, ssd_step=step, gated_rmsnorm=gated, add_rmsnorm=add_norm, causal_conv=conv)


@dataclass(frozen=True)
class Kernels:
    name: str  # "mamba_ssm" or "reference"
    ssd: Callable
    ssd_step: Callable
    gated_rmsnorm: Callable
    add_rmsnorm: Callable
    causal_conv: Callable
    for_compile: Kernels | None = None  # what a block uses while torch.compile traces it (None: the same)


REFERENCE = Kernels("reference", ref_ssd, ref_ssd_step, ref_gated_rmsnorm, ref_add_rmsnorm, ref_causal_conv)


# What torch.compile'd Mamba blocks see of mamba_ssm (benchmarks/gpu_mamba.py compares them):
#   "opaque"    each mamba_ssm op behind torch.compiler.disable (graph breaks around every op)
#   "traced"    dynamo traces into mamba_ssm's autograd.Functions and Triton launches
#   "custom_op" the SSD scan and the Triton causal conv as torch.library custom ops, the norms in
#               torch, so the block is one graph and inductor fuses the rest (avengers.models.mamba.compile);
#               the default: no graph breaks, 1.10x eager at batch 2 through train_mamba.sh (docs/mamba.md)
# Eager execution is the same in all three.
COMPILE_MODES = ("opaque", "traced", "custom_op")
COMPILE_MODE = "custom_op"


@functools.cache
def _mamba_ssm_kernels(compile_mode: str) -> Kernels | None:
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"COMPILE_MODE={compile_mode!r}: expected one of {COMPILE_MODES}")
    try:
        ops = _mamba_ssm_ops()
    except ImportError as e:
        warnings.warn(
            f"mamba_ssm is not importable ({e}); Mamba-2 layers run the pure-torch reference on "
            "CUDA, which is slow and memory-hungry. pip install -r requirements-gpu.txt",
            stacklevel=3,
        )
        return None
    if compile_mode == "traced":
        return Kernels("mamba_ssm", **ops)
    conv = ops["causal_conv"]
    ops = {k: torch.compiler.disable(f) for k, f in ops.items()}
    for_compile = None
    if compile_mode == "custom_op":
        from avengers.models.mamba.compile import mamba_ssm_ssd_op, ssd_training

        if conv is not ref_causal_conv:  # ours (a custom op), or causal-conv1d's, which dynamo cannot trace
            from avengers.models.mamba.causal_conv_triton import self_test, triton_causal_conv

            conv = triton_causal_conv if conv is triton_causal_conv or self_test() else ref_causal_conv
        for_compile = Kernels(
            "mamba_ssm_compile",
            ssd_training(mamba_ssm_ssd_op(), ops["ssd"]),
            ops["ssd_step"],
            ref_gated_rmsnorm,
            ref_add_rmsnorm,
            conv,
        )
    return Kernels("mamba_ssm", **ops, for_compile=for_compile)


def select_kernels(device: torch.device, mode: str = "auto") -> Kernels:
    """mode auto: mamba_ssm on CUDA when importable (one warning when not), reference elsewhere."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r}: expected one of {KERNEL_MODES}")
    if mode == "reference" or (mode == "auto" and device.type != "cuda"):
        return REFERENCE
    if device.type != "cuda":
        raise ValueError(f"kernels='mamba_ssm' needs CUDA tensors, got device {device}; use 'auto' or 'reference'")
    kernels = _mamba_ssm_kernels(COMPILE_MODE)
    if kernels is None:
        if mode == "mamba_ssm":
            raise RuntimeError("kernels='mamba_ssm' but mamba_ssm cannot be imported; see the warning above")
        return REFERENCE
    return kernels
