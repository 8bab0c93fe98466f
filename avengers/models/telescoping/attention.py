"""Telescoping attention: its options, the parallel form (training, prefill) and the module.

The parallel form fills the schedule's node array with one vectorised pairwise merge pass per
depth, then lets query t attend to the nodes `table[t]`: the gather reference here, or a
flex_attention block-sparse kernel (flex.py). The recurrent form (decode) is
avengers.decode.telescoping. Defaults follow the documented June 2024 version: linear gate on
the normed block input, k/v RMSNorm at read time, EMPTY slots not masked (they act as logit-0,
value-0 sinks), no soft cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fms.modules.attention import MultiHeadAttention
from torch import nn

from avengers.models.telescoping.flex import build_block_mask, flex_attention_nodes, node_layout
from avengers.models.telescoping.schedule import TelePlan, build_schedule, resolve_fmap
from avengers.ops.telescoping import EMPTY_LOG_MASS, compute_dtype, rms_norm, rope, softcap, wisq_gate


@dataclass(frozen=True)
class TeleOptions:
    cache_size: int
    fmap: tuple[int, ...]
    gate: str = "linear"  # "linear" (documented) | "wisq"
    mask_empty: bool = False  # documented: EMPTY slots are logit-0 / value-0 sinks
    softcap: float | None = None  # later variants: 20.0
    kv_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "fmap", resolve_fmap(self.fmap, self.cache_size))
        if self.gate not in ("linear", "wisq"):
            raise ValueError(f"gate must be 'linear' or 'wisq', got {self.gate!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {self.softcap!r}")


_PLANS: dict[tuple, TelePlan] = {}
FLEX_BLOCK_Q = 128  # flex column runs per 128 queries (flex.node_layout); None: node array


@torch.compiler.disable
def get_plan(
    n: int,
    cache_size: int,
    fmap: tuple[int, ...],
    device: torch.device | str,
    flex: bool = False,
    flex_block_q: int | None = FLEX_BLOCK_Q,
) -> TelePlan:
    """Cached TelePlan for (n, C, fmap, device, path); built on CPU once, then copied over."""
    device = torch.device(device)
    key = (n, cache_size, fmap, str(device), flex, flex_block_q if flex else None)
    if key not in _PLANS:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        sched = build_schedule(n, cache_size, fmap)
        plan = TelePlan(sched, device)
        if flex:
            plan.layout = node_layout(sched, flex_block_q, device)
            plan.block_mask = build_block_mask(n, plan.layout, device)
        _PLANS[key] = plan
    return _PLANS[key]


def node_values(
    k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, plan: TelePlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-normed node means K̄, V̄ [B, Hkv, N, d] and log-masses Ŵ [B, Hkv, N] (heads first).

    k (RoPE'd), v [B, n, Hkv, d]; w [B, n, Hkv]. One pairwise merge pass per depth: the new
    node is p_a*a + p_b*b with p = softmax(Ŵ_a, Ŵ_b), Ŵ = logsumexp (never prefix-sum differences).
    """
    dt = compute_dtype(k.dtype)
    B, _, Hkv, d = k.shape
    K = torch.cat([k.new_zeros(B, Hkv, 1, d, dtype=dt), k.to(dt).transpose(1, 2)], 2)
    V = torch.cat([v.new_zeros(B, Hkv, 1, d, dtype=dt), v.to(dt).transpose(1, 2)], 2)
    W = torch.cat([w.new_full((B, Hkv, 1), EMPTY_LOG_MASS, dtype=dt), w.to(dt).transpose(1, 2)], 2)
    for a, b in plan.passes:
        wa, wb = W[:, :, a], W[:, :, b]
        wn = torch.logaddexp(wa, wb)
        pa, pb = torch.exp(wa - wn).unsqueeze(-1), torch.exp(wb - wn).unsqueeze(-1)
        K = torch.cat([K, pa * K[:, :, a] + pb * K[:, :, b]], 2)
        V = torch.cat([V, pa * V[:, :, a] + pb * V[:, :, b]], 2)
        W = torch.cat([W, wn], 2)
    return K, V, W


def gather_attention(
    q: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    plan: TelePlan,
    opts: TeleOptions,
    chunk_elems: int = 2**26,
) -> torch.Tensor:
    """Reference read-out: query t attends to the C nodes table[t]. q [B,n,H,d] -> [B,n,H,d].

    k_hat, v_hat [B, Hkv, N, d]. Materialises [B, Hkv, n, C, d] (in query chunks of at most
    `chunk_elems` elements when no gradient is needed); the GPU training path is
    flex.flex_attention_nodes.
    """
    B, n, H, d = q.shape
    Hkv, C = k_hat.shape[1], plan.table.shape[1]
    per_query = B * C * Hkv * d
    if torch.is_grad_enabled() or n * per_query <= chunk_elems:
        return _gather_chunk(q, k_hat, v_hat, plan.table, opts)
    step = max(1, chunk_elems // per_query)
    return torch.cat(
        [_gather_chunk(q[:, i : i + step], k_hat, v_hat, plan.table[i : i + step], opts) for i in range(0, n, step)], 1
    )


def _gather_chunk(
    q: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor, table: torch.Tensor, opts: TeleOptions
) -> torch.Tensor:
    B, n, H, d = q.shape
    Hkv = k_hat.shape[1]
    kg, vg = k_hat[:, :, table], v_hat[:, :, table]  # [B, Hkv, n, C, d]
    qg = q.view(B, n, Hkv, H // Hkv, d)
    s = torch.einsum("bthed,bhtcd->bthec", qg, kg) * d**-0.5
    s = softcap(s.to(compute_dtype(s.dtype)), opts.softcap)
    if opts.mask_empty:
        s = s.masked_fill((table == 0)[None, :, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(vg.dtype)
    return torch.einsum("bthec,bhtcd->bthed", p, vg).reshape(B, n, H, d)


def telescoping_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    plan: TelePlan,
    opts: TeleOptions,
    k_gain: torch.Tensor | None = None,
    v_gain: torch.Tensor | None = None,
    impl: str = "gather",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Parallel form. q [B,n,H,d], k [B,n,Hkv,d] (both RoPE'd), v, w [B,n,Hkv].

    Returns the attention output [B,n,H,d] in q's dtype and the node arrays (K̄, V̄, Ŵ).
    """
    nodes = node_values(k, v, w, plan)
    K, V, _ = nodes
    if opts.kv_norm:
        K, V = rms_norm(K, k_gain), rms_norm(V, v_gain)
    K, V = K.to(q.dtype), V.to(q.dtype)
    if impl == "flex":
        out = flex_attention_nodes(q, K, V, plan, opts)
    elif impl == "gather":
        out = gather_attention(q, K, V, plan, opts)
    else:
        raise ValueError(f"impl must be 'gather' or 'flex', got {impl!r}")
    return out.to(q.dtype), nodes


class GainNorm(nn.Module):
    """RMSNorm gain vector (no bias, no centering) applied by rms_norm at read time."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class TelescopingAttention(MultiHeadAttention):
    """ibm-fms MultiHeadAttention (same in_proj / dense parameters) with a telescoping cache.

    Extra parameters: `gate` (Linear d_model -> H_kv, bias-free; linear gate only) and the k/v
    read-time RMSNorm gains `k_norm.weight`, `v_norm.weight` [head_dim] (with kv_norm).
    """

    def __init__(
        self,
        emb_dim: int,
        nheads: int,
        kvheads: int,
        opts: TeleOptions,
        rope_theta: float,
        impl: str = "auto",
        use_bias: bool = False,
        fused: bool = True,
        linear_config=None,
    ):
        if impl not in ("auto", "gather", "flex"):
            raise ValueError(f"tele impl must be 'auto', 'gather' or 'flex', got {impl!r}")
        head_dim = emb_dim // nheads
        super().__init__(
            emb_dim,
            head_dim,
            head_dim,
            nheads,
            kvheads,
            p_dropout=0.0,
            use_bias=use_bias,
            position_encoder=None,
            fused=fused,
            linear_config=linear_config,
        )
        self.opts = opts
        self.rope_theta = rope_theta
        self.impl = impl
        self.gate = nn.Linear(emb_dim, kvheads, bias=False) if opts.gate == "linear" else None
        self.k_norm = GainNorm(head_dim) if opts.kv_norm else None
        self.v_norm = GainNorm(head_dim) if opts.kv_norm else None

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        nn.init.trunc_normal_(self.dense.weight, mean=0.0, std=0.02)
        if self.use_bias:
            self.dense.bias.data.zero_()
        if self.gate is not None:
            nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=0.02)
        for norm in (self.k_norm, self.v_norm):
            if norm is not None:
                norm.reset_parameters()

    def resolve_impl(self, device: torch.device) -> str:
        """auto: flex for CUDA training; the (chunked) gather otherwise, which needs no compile
        per sequence length (eval, prefill) and holds no activations without autograd."""
        if self.impl == "auto":
            return "flex" if device.type == "cuda" and torch.is_grad_enabled() else "gather"
        return self.impl

    def plan(self, n: int, device: torch.device) -> TelePlan:
        flex = self.resolve_impl(device) == "flex"
        return get_plan(n, self.opts.cache_size, self.opts.fmap, device, flex)

    def _gains(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k_norm is None:
            return None, None
        return self.k_norm.weight, self.v_norm.weight

    def _project_raw(self, x: torch.Tensor):
        """q, k (not rotated), v [B,T,*,d] and the linear gate's logits w [B,T,Hkv] in compute dtype
        (None for the WISQ gate, which needs the rotated q and k)."""
        B, T, _ = x.shape
        q, k, v = self.in_proj(x, None, None)
        w = None
        if self.gate is not None:
            dt = compute_dtype(x.dtype)
            with torch.autocast(device_type=x.device.type, enabled=False):
                w = F.linear(x.to(dt), self.gate.weight.to(dt)).view(B, T, self.kvheads)
        return (
            q.view(B, T, self.nheads, self.emb_kq_per_head),
            k.view(B, T, self.kvheads, self.emb_kq_per_head),
            v.view(B, T, self.kvheads, self.emb_v_per_head),
            w,
        )

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """q, k (RoPE'd, compute dtype), v [B,T,*,d] and the gate w [B,T,Hkv] (compute dtype)."""
        q, k, v, w = self._project_raw(x)
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        return q, k, v, wisq_gate(q, k) if w is None else w

    def _parallel(self, x: torch.Tensor, plan: TelePlan):
        B, n, _ = x.shape
        q, k, v, w = self._project(x, torch.arange(n, device=x.device))
        attn_dtype = v.dtype  # the projection's output dtype (bf16 under autocast)
        out, nodes = telescoping_parallel(
            q.to(attn_dtype), k, v, w, plan, self.opts, *self._gains(), impl=self.resolve_impl(x.device)
        )
        return self.dense(out.reshape(B, n, self.nheads * self.emb_v_per_head)), nodes

    def forward(
        self,
        q: torch.Tensor,
        k=None,
        v=None,
        position_ids=None,
        past_key_value_state=None,
        use_cache: bool = False,
        tele_plan: TelePlan | None = None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """Training / full forward over positions 0..n-1 (LLaMABlock calls it like fms attention)."""
        if k is not None or v is not None or past_key_value_state is not None or use_cache or position_ids is not None:
            raise ValueError(
                "TelescopingAttention is causal self-attention from position 0; for decode use "
                "the model's cache= path (position_ids / use_cache / past_key_value_state unsupported)"
            )
        plan = tele_plan if tele_plan is not None else self.plan(q.shape[1], q.device)
        return self._parallel(q, plan)[0]

    def prefill(self, x: torch.Tensor, state) -> torch.Tensor:
        """Parallel form over positions 0..P-1, then the state of table row P-1."""
        plan = self.plan(x.shape[1], x.device)
        out, nodes = self._parallel(x, plan)
        state.load_nodes(nodes, plan.table[-1])
        return out
