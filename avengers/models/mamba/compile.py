"""The SSD scan and the causal conv as torch.library custom ops, so a compiled Mamba block is one graph.

torch.compile cannot see into mamba_ssm's autograd.Function cleanly: tracing it captures every
Triton launch (with functionalisation copies), and hiding it behind torch.compiler.disable splits
each block into several graphs. Registered as an opaque custom op with a fake (shape) function and
an autograd formula, the scan stays mamba_ssm's kernels while inductor compiles and fuses the rest
of the block (projections' glue, the RMSNorms in plain torch). The causal conv is our Triton kernel
behind a custom op the same way (inductor would otherwise call cuDNN's slow depthwise conv).

`make_ssd_op` and `make_conv_op` take the forward/backward implementations as arguments; the GPU
build passes mamba_ssm's `_mamba_chunk_scan_combined_fwd/_bwd` (below) and causal_conv_triton its
`conv_forward/conv_backward` (eager blocks call the same op), the tests pass the pure-torch references.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

# fwd(x, dt, A, B, C, D, dt_bias, chunk_size) -> y ; bwd(dy, x, dt, A, B, C, D, dt_bias, y, chunk_size) -> 7 grads
SsdFwd = Callable[..., Tensor]
SsdBwd = Callable[..., tuple[Tensor, ...]]


def make_ssd_op(name: str, fwd: SsdFwd, bwd: SsdBwd):
    """Register `name` (e.g. "avengers::mamba2_ssd") and its backward op; returns the forward op.

    Inputs are made contiguous by the caller (`ssd_training`), so the fake functions' contiguous
    outputs describe the real ones exactly; outputs are fresh tensors in the inputs' dtypes.
    """

    @torch.library.custom_op(name, mutates_args=())
    def ssd(
        x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor, chunk_size: int
    ) -> Tensor:
        return fwd(x, dt, A, B, C, D, dt_bias, chunk_size).to(x.dtype).contiguous()

    @ssd.register_fake
    def _(x, dt, A, B, C, D, dt_bias, chunk_size):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.custom_op(name + "_bwd", mutates_args=())
    def ssd_bwd(
        dy: Tensor,
        x: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        dt_bias: Tensor,
        y: Tensor,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = bwd(dy, x, dt, A, B, C, D, dt_bias, y, chunk_size)
        return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, dt, A, B, C, D, dt_bias)))

    @ssd_bwd.register_fake
    def _(dy, x, dt, A, B, C, D, dt_bias, y, chunk_size):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x, dt, A, B, C, D, dt_bias))

    def setup_context(ctx, inputs, output):
        x, dt, A, B, C, D, dt_bias, chunk_size = inputs
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, output)
        ctx.chunk_size = chunk_size

    def backward(ctx, dy):
        x, dt, A, B, C, D, dt_bias, y = ctx.saved_tensors
        return (*ssd_bwd(dy.contiguous(), x, dt, A, B, C, D, dt_bias, y, ctx.chunk_size), None)

    ssd.register_autograd(backward, setup_context=setup_context)
    return ssd


def ssd_training(op, with_state: Callable) -> Callable:
    """A Kernels.ssd that calls the custom op for training (no initial or final state), else `with_state`."""

    def ssd(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state=None, return_final=False):
        if initial_state is not None or return_final:
            return with_state(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state, return_final)
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        return op(x, dt, A.contiguous(), B, C, D.contiguous(), dt_bias.contiguous(), chunk_size), None

    return ssd


@functools.cache
def mamba_ssm_ssd_op():
    """The custom op over mamba_ssm's Triton SSD (registered once per process)."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd

    def fwd(x, dt, A, B, C, D, dt_bias, chunk_size):
        return _mamba_chunk_scan_combined_fwd(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)[0]

    def bwd(dy, x, dt, A, B, C, D, dt_bias, y, chunk_size):
        dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = _mamba_chunk_scan_combined_bwd(
            dy, x, dt, A, B, C, y, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True
        )
        return dx, ddt, dA, dB, dC, dD, ddt_bias

    return make_ssd_op("avengers::mamba2_ssd", fwd, bwd)


def make_conv_op(name: str, fwd: Callable, bwd: Callable):
    """Register `name` (e.g. "avengers::causal_conv") and its backward op; returns the forward op.

    fwd(x [b, l, c], weight [c, 1, W], bias or None, silu) -> [b, l, c] contiguous;
    bwd(grad, x, weight, bias, silu) -> (dx, dweight, dbias or None).
    """

    @torch.library.custom_op(name, mutates_args=())
    def conv(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        return fwd(x, weight, bias, silu).contiguous()

    @conv.register_fake
    def _(x, weight, bias, silu):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.custom_op(name + "_bwd", mutates_args=())
    def conv_bwd(
        grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dw, db = bwd(grad, x, weight, bias, silu)
        db = db.to(bias.dtype).contiguous() if bias is not None else weight.new_empty(0)  # outputs cannot be None
        return dx.to(x.dtype).contiguous(), dw.to(weight.dtype).contiguous(), db

    @conv_bwd.register_fake
    def _(grad, x, weight, bias, silu):
        db = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else weight.new_empty(0)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight), db

    def setup_context(ctx, inputs, output):
        x, weight, bias, silu = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu

    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = conv_bwd(grad.contiguous(), x, weight, bias, ctx.silu)
        return dx, dw, (db if bias is not None else None), None

    conv.register_autograd(backward, setup_context=setup_context)
    return conv


def conv_channel_first_view(op) -> Callable:
    """A Kernels.causal_conv over a channel-last op: x [b, c, l] (the mixer's transposed view) ->
    [b, c, l], a view of the op's [b, l, c] output."""

    def causal_conv(x, weight, bias, silu):
        x_blc = x.transpose(1, 2)
        if x_blc.stride(-1) != 1:
            x_blc = x_blc.contiguous()
        return op(x_blc, weight, bias, silu).transpose(1, 2)

    return causal_conv
