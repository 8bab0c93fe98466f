"""Small-batch GEMV with fused RMSNorm prologue, SwiGLU or residual epilogue, and RoPE, in Triton.

A Llama decode step at batch 1 is bandwidth-bound on the weights, but torch runs each block as
~13 kernels (norm, matmul, RoPE, residual add, SiLU-multiply, ...), and at 1-2B parameters their
fixed per-kernel cost is as large as the weight reads (docs/benchmarks.md). Here a block's four
weight matmuls are four kernels that also do the work around them:

    rmsnorm(h) @ Wqkv^T          h + attn @ Wo^T          silu(g) * u, [g; u] = rmsnorm(h) @ Wg1^T          h + a @ W2^T

plus one kernel for the query/key rotation. References: llama_compiled.decode_pre/decode_post
(the same maths in torch); tests compare the two. Each program owns BLOCK_N output rows and
streams its weight rows once for every sequence of the (small) batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BATCH = 8  # larger batches are not weight-bound at these sizes: the torch path serves them
BLOCK_N = 16


@triton.jit
def _gemv_kernel(X, NormW, W, Res, Out, K, N, eps, sxb, srb, sob,
                 BB: tl.constexpr, B: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                 RESIDUAL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    bs = tl.arange(0, BB)
    b_ok = bs < B
    rstd = tl.full((BB,), 1.0, tl.float32)
    if NORM:  # rms of every sequence's input row (re-read by each program; it is small)
        ss = tl.zeros((BB,), tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(X + bs[:, None] * sxb + ks[None, :], mask=b_ok[:, None] & (ks < K)[None, :], other=0.0)
            x = x.to(tl.float32)
            ss += tl.sum(x * x, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros((BB, BN), tl.float32)
    acc_up = tl.zeros((BB, BN), tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(X + bs[:, None] * sxb + ks[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # as torch rounds rms_norm's output to the weights' dtype before the matmul
            g = tl.load(NormW + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * rstd[:, None] * g[None, :]).to(W.dtype.element_ty)
        x = x.to(tl.float32)
        wm = r_ok[:, None] & k_ok[None, :]
        w = tl.load(W + rows[:, None] * K + ks[None, :], mask=wm, other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], 2)
        if SWIGLU:  # the up rows sit N rows below the gate rows in the fused [gate; up] weight
            u = tl.load(W + (rows[:, None] + N) * K + ks[None, :], mask=wm, other=0.0).to(tl.float32)
            acc_up += tl.sum(x[:, None, :] * u[None, :, :], 2)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    om = b_ok[:, None] & r_ok[None, :]
    if RESIDUAL:
        acc += tl.load(Res + bs[:, None] * srb + rows[None, :], mask=om, other=0.0).to(tl.float32)
    tl.store(Out + bs[:, None] * sob + rows[None, :], acc.to(Out.dtype.element_ty), mask=om)


def gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """x [B, K] (B <= MAX_BATCH, unit last stride) @ weight[N', K]^T with the optional fusions:
    rmsnorm(x) * norm_weight first; swiglu: weight is [gate; up] (N' = 2N), output silu(gate) * up;
    residual [B, N] added last. Returns [B, N] in x's dtype."""
    B, K = x.shape
    if not 1 <= B <= MAX_BATCH or x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != K:
        raise ValueError(f"gemv needs x [B <= {MAX_BATCH}, K] with unit last stride and a contiguous weight [N, K]; "
                         f"got x {tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}")
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = torch.empty(B, N, device=x.device, dtype=x.dtype)
    if residual is not None and (residual.shape != out.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be [{B}, {N}] with unit last stride, got {tuple(residual.shape)}")
    bb = triton.next_power_of_2(B)
    bk = max(64, 512 // bb)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, norm_weight if norm_weight is not None else x, weight, residual if residual is not None else out, out,
        K, N, eps, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        bb, B, norm_weight is not None, swiglu, residual is not None, BLOCK_N, bk)
    return out


@triton.jit
def _rope_kernel(QKV, Cos, Sin, Out, sqb, H_ROT, HALF: tl.constexpr, BH: tl.constexpr):
    """Rotate adjacent pairs of the first H_ROT heads of one sequence's qkv row: out [B, H_ROT, 2*HALF]."""
    b, h = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, BH)
    ok = i < HALF
    base = QKV + b * sqb + h * 2 * HALF
    x0 = tl.load(base + 2 * i, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(base + 2 * i + 1, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(Cos + h * HALF + i, mask=ok, other=0.0)
    s = tl.load(Sin + h * HALF + i, mask=ok, other=0.0)
    o = Out + (b * H_ROT + h) * 2 * HALF
    tl.store(o + 2 * i, (x0 * c - x1 * s).to(Out.dtype.element_ty), mask=ok)
    tl.store(o + 2 * i + 1, (x0 * s + x1 * c).to(Out.dtype.element_ty), mask=ok)


def rope_pairs(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [B, >= heads * d] (unit last stride): its first `heads` heads rotated by cos/sin [heads, d/2]
    (fp32, adjacent pairs, ibm-fms layout) -> [B, heads, d] in qkv's dtype."""
    half = cos.shape[-1]
    if cos.shape != (heads, half) or sin.shape != cos.shape or qkv.stride(-1) != 1:
        raise ValueError(f"cos/sin must be [{heads}, d/2] and qkv unit-stride; got {tuple(cos.shape)}, {tuple(sin.shape)}")
    B = qkv.shape[0]
    out = torch.empty(B, heads, 2 * half, device=qkv.device, dtype=qkv.dtype)
    _rope_kernel[(B, heads)](qkv, cos.float().contiguous(), sin.float().contiguous(), out, qkv.stride(0), heads,
                             half, triton.next_power_of_2(half))
    return out


def decode_pre(h: torch.Tensor, ln_w: torch.Tensor, eps: float, qkv_w: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, H: int, Hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama_compiled.decode_pre in two kernels: norm + QKV GEMV, then the q/k rotation."""
    B = h.shape[0]
    qkv = gemv(h.reshape(B, -1), qkv_w, norm_weight=ln_w, eps=eps)
    rot = rope_pairs(qkv, cos, sin, H + Hkv)
    return rot[:, :H], rot[:, H:].unsqueeze(2), qkv[:, (H + Hkv) * d:].reshape(B, Hkv, 1, d)


def decode_post(h: torch.Tensor, attn: torch.Tensor, dense_w: torch.Tensor, ln_w: torch.Tensor, eps: float,
                wg1_w: torch.Tensor, w2_w: torch.Tensor, hidden: int) -> torch.Tensor:
    """llama_compiled.decode_post in three kernels: Wo + residual, norm + [Wg; W1] + SwiGLU, W2 + residual."""
    B, _, D = h.shape
    h2 = gemv(attn.reshape(B, -1), dense_w, residual=h.reshape(B, D))
    if wg1_w.shape[0] != 2 * hidden:
        raise ValueError(f"fused gate/up weight has {wg1_w.shape[0]} rows, expected 2 * {hidden}")
    a = gemv(h2, wg1_w, norm_weight=ln_w, eps=eps, swiglu=True)
    return gemv(a, w2_w, residual=h2).view(B, 1, D)
