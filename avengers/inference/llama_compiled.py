"""Optional torch.compile of Llama's decode step: the element-wise work around the matmuls fused.

A decode step at batch 1 is a chain of small kernels (norms, RoPE, SiLU, residual adds) between
the weight matmuls; on a 1-2B model their launch and tail time is comparable to the time spent
reading the weights. Two pure functions per block (before and after attention) take the weights
as arguments, so one compiled graph serves every layer; the key/value write and the attention
kernel stay outside (an in-place write inside a compiled function could be turned into a copy of
the whole cache). Enabled with `set_fused_decode("inductor")` (`bench --compile`), or with the Triton
kernels of triton_gemv.py, which also fuse the norms, SwiGLU and residual adds into the matmuls
(`bench --fused_decode triton`); the eager path in kv_cache.py is the reference and tests compare them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

FUSED_DECODE_MODES = ("off", "eager", "inductor", "triton", "persistent", "gluon")
TRITON_MODES = ("triton", "persistent", "gluon")  # the modes whose small-batch steps run Triton GEMVs
_state: dict = {"mode": "off"}
# The largest batch the "triton" and "persistent" modes' GEMV steps serve (Llama, Mamba-2, hybrids,
# telescoping); larger batches take the compiled path. H200 at 1k context, ms/step vs
# --compile (docs/benchmarks.md): llama3_1.8b batch 1 1.37 vs 1.69, batch 2 1.81 vs 1.78, batch 4
# 3.07 vs 1.83, batch 8 5.23 vs 1.91; mamba2_1.3b batch 1 1.76 vs 1.87, batch 8 5.42 vs 2.43 (a
# GEMV program re-reads its input tile for every few rows of weights). The kernels themselves take
# up to triton_gemv.MAX_BATCH rows.
GEMV_STEP_MAX_BATCH = 1


def set_fused_decode(mode: str) -> None:
    """Route eligible decode blocks through decode_pre/decode_post as written here ("eager"),
    torch.compile'd ("inductor"; it also compiles the telescoping layers' telescoping.step_core),
    as the fused Triton kernels of triton_gemv.py ("triton", CUDA or Triton's interpreter; batches
    above GEMV_STEP_MAX_BATCH take the inductor functions; Mamba-2, hybrid and telescoping models'
    steps take MambaLM._triton_decode and TelescopingLlama._triton_step), or as one persistent
    Triton kernel per block (triton_block.py, "persistent"; same fallback), or a Llama's whole
    batch-1 step through its blocks as one Gluon kernel (gluon_step.LlamaStepKernel, "gluon"; other
    models, batches and caches over LlamaStepKernel.MAX_CACHE_TOKENS as "triton"); "off": the
    per-module path in kv_cache.py."""
    if mode not in FUSED_DECODE_MODES:
        raise ValueError(f"fused decode mode must be one of {FUSED_DECODE_MODES}, got {mode!r}")
    _state["mode"] = mode


def fused_decode_mode() -> str:
    return _state["mode"]


def compiled_step_cores() -> bool:
    """Whether the models' element-wise decode steps between projections (telescoping.step_core,
    mamba.conv_step) run torch.compile'd: in the "inductor" mode, and around the "triton" mode's GEMVs."""
    return _state["mode"] in ("inductor", "triton", "gluon")


def triton_gemv_step(batch: int) -> bool:
    """Whether a decode step of `batch` sequences takes a model's Triton GEMV step (the "triton"
    mode, batch up to GEMV_STEP_MAX_BATCH); the model also checks that its layout allows it."""
    return _state["mode"] in ("triton", "gluon") and batch <= GEMV_STEP_MAX_BATCH


@contextlib.contextmanager
def fused_decode(mode: str):
    """set_fused_decode(mode) for the duration of a with-block; the previous mode afterwards."""
    before = _state["mode"]
    set_fused_decode(mode)
    try:
        yield
    finally:
        _state["mode"] = before


def is_plain_rms_norm(norm: nn.Module) -> bool:
    """An ibm-fms LayerNormParameterized that is RMSNorm with a gain and no shift."""
    return not norm.use_mean and norm.elementwise_scale and not norm.elementwise_shift


def decode_pre(
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    qkv_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    H: int,
    Hkv: int,
    d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B, 1, D] -> q [B, H, d] (rotated, pre-scaled), k, v [B, H_kv, 1, d]; cos/sin [H + H_kv, d/2]."""
    B = h.shape[0]
    qkv = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps), qkv_w).reshape(B, -1)
    qk = qkv[:, : (H + Hkv) * d].reshape(B, H + Hkv, d // 2, 2).float()
    x0, x1 = qk[..., 0], qk[..., 1]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(h.dtype)
    return rot[:, :H], rot[:, H:].unsqueeze(2), qkv[:, (H + Hkv) * d :].reshape(B, Hkv, 1, d)


def decode_post(
    h: torch.Tensor,
    attn: torch.Tensor,
    dense_w: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    wg1_w: torch.Tensor,
    w2_w: torch.Tensor,
    hidden: int,
) -> torch.Tensor:
    """Residual + attention output projection, then the gated MLP block (ibm-fms order: wg, then w1)."""
    h = h + F.linear(attn, dense_w)
    wg, w1 = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps), wg1_w).split(hidden, dim=-1)
    return h + F.linear(F.silu(wg) * w1, w2_w)


def eligible(layer: nn.Module) -> bool:
    """The block has the layout the pure functions assume (fused weights, no biases, SiLU, RMSNorm)."""
    attn, ff = layer.attn, layer.ff_sub_layer
    norms_ok = is_plain_rms_norm(layer.ln) and is_plain_rms_norm(layer.ff_ln)
    return (
        norms_ok
        and hasattr(attn.in_proj, "qkv_fused")
        and getattr(ff, "wg1_fused", None) is not None
        and isinstance(ff.a, nn.SiLU)
        and attn.in_proj.qkv_fused.bias is None
        and attn.dense.bias is None
        and ff.wg1_fused.bias is None
        and ff.w2.bias is None
        and not getattr(ff, "p_dropout", 0)
    )


@functools.cache
def _torch_functions(mode: str):
    """(pre_write, post) from the torch functions, plain or torch.compile'd (built once, dynamic
    shapes); the cache write stays outside the compiled graph."""
    pre, post = decode_pre, decode_post
    if mode == "inductor":
        pre = torch.compile(decode_pre, dynamic=True, fullgraph=True)
        post = torch.compile(decode_post, dynamic=True, fullgraph=True)

    def pre_write(*args, state, position):
        q, k, v = pre(*args)
        state.write_at(k, v, position)
        return q

    return pre_write, post


def functions(mode: str, batch_size: int):
    """(pre_write, post) for the mode: pre_write(h, ln_w, eps, qkv_w, cos, sin, H, H_kv, d, state,
    position) -> q also writes the token's key/value into the cache."""
    if mode in TRITON_MODES:
        from avengers.inference import triton_gemv

        if batch_size <= GEMV_STEP_MAX_BATCH:
            return triton_gemv.decode_pre_write, triton_gemv.decode_post
        mode = "inductor"
    return _torch_functions(mode)


def decode_block(
    layer: nn.Module,
    h: torch.Tensor,
    state,
    position: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention,
    length: torch.Tensor,
) -> torch.Tensor:
    """One Llama block for one token; `attention(q [B, H, d]) -> [B, H, d]` reads the updated cache
    (valid up to the 0-dim device `length`). cos/sin [H + H_kv, d/2], fp32 and contiguous."""
    attn, ff = layer.attn, layer.ff_sub_layer
    if _state["mode"] == "persistent":
        from avengers.inference import triton_block

        if h.shape[0] <= GEMV_STEP_MAX_BATCH:
            return triton_block.decode_block(
                h,
                layer.ln.weight,
                layer.ln.eps,
                attn.in_proj.qkv_fused.weight,
                cos,
                sin,
                attn.nheads,
                attn.kvheads,
                attn.emb_kq_per_head,
                state,
                position,
                length,
                attn.dense.weight,
                layer.ff_ln.weight,
                layer.ff_ln.eps,
                ff.wg1_fused.weight,
                ff.w2.weight,
                ff.hidden_dim,
            )
    pre_write, post = functions(_state["mode"], h.shape[0])
    q = pre_write(
        h,
        layer.ln.weight,
        layer.ln.eps,
        attn.in_proj.qkv_fused.weight,
        cos,
        sin,
        attn.nheads,
        attn.kvheads,
        attn.emb_kq_per_head,
        state=state,
        position=position,
    )
    out = attention(q).reshape(h.shape[0], 1, -1)
    return post(
        h, out, attn.dense.weight, layer.ff_ln.weight, layer.ff_ln.eps, ff.wg1_fused.weight, ff.w2.weight, ff.hidden_dim
    )


def decode_head(norm: nn.Module, head: nn.Linear, h: torch.Tensor) -> torch.Tensor | None:
    """Final RMSNorm + LM head of a decode step as one Triton GEMV (Triton modes, small batch,
    plain RMSNorm and bias-free head); None where the caller's own path applies."""
    if _state["mode"] not in TRITON_MODES or head.bias is not None or not is_plain_rms_norm(norm):
        return None
    from avengers.inference import triton_gemv

    B = h.shape[0]
    if B > GEMV_STEP_MAX_BATCH:
        return None
    return triton_gemv.gemv(h.reshape(B, -1), head.weight, norm_weight=norm.weight, eps=norm.eps).view(B, 1, -1)
