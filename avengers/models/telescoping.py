"""Telescoping-cache attention and its Llama variants (shared/specs/telescoping-cache.md).

Each layer keeps C slots per KV head; slot c holds the exp(w)-weighted mean of the (RoPE'd) keys
and of the values of one contiguous token range, and older slots cover exponentially longer
ranges. The slot contents at step t depend only on t, C and the fmap (level -> merge slot), so:

- the *schedule* is simulated once on CPU per (n, C, fmap) into a node array (EMPTY, the n
  tokens, then every merged range ordered by depth) plus `table[t, c]`, the node in slot c at t;
- the *parallel form* (training, prefill) fills the node array with one vectorised pairwise merge
  pass per depth, then lets query t attend to the nodes `table[t]` (gather reference here, a
  flex_attention block-sparse kernel in telescoping_flex.py);
- the *recurrent form* (decode) keeps the C slot means and log-masses and applies the same merge
  rule one step at a time (TelescopingState).

Defaults follow the documented June 2024 version: linear gate on the normed block input, k/v
RMSNorm at read time, EMPTY slots not masked (they act as logit-0, value-0 sinks), no soft cap.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fms.models.llama import LLaMABlock, LLaMAConfig
from fms.modules.attention import MultiHeadAttention
from torch import nn

from avengers.inference import llama_compiled
from avengers.inference.cache import InferenceCache
from avengers.inference.kv_cache import KVState, decode_attention, padded_len
from avengers.inference.llama_compiled import compiled_step_cores, triton_gemv_step
from avengers.models.llama import TINY_VOCAB, Llama, llama_param_counts
from avengers.models.registry import ModelSpec, get_model_spec, register

EMPTY_LOG_MASS = -1000.0  # log-mass of an EMPTY slot: zero weight in any merge
EMPTY_THRESHOLD = -100.0  # a slot is EMPTY iff its log-mass is at or below this
NORM_EPS = 1e-6

# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

FMAP_PRESETS: dict[str, tuple[int, ...]] = {
    # merge slot m_l for levels l = 1..L (spec §1); "c16" is this project's tele_tiny choice
    "c8": (2, 4, 6),
    "c16": (4, 8, 11, 14),
    "c32": (7, 13, 18, 22, 25, 27, 29),
    "c64": tuple(64 - (8 - level) ** 2 for level in range(1, 7)),  # 15, 28, 39, 48, 55, 60
    "c128": (26, 50, 71, 89, 104, 116, 124),
    "c128_wide": tuple(16 + 14 * (level - 1) for level in range(1, 9)),  # the July "7k cache"
    "c128_wisq": tuple(16 * level for level in range(1, 8)),
    "c256": (64, 118, 162, 194, 214, 226, 236, 244, 250),
    "c256_sixteenth": (64, 72, 80, 88),
    "c512": (64, 72, 80),  # the "1/8 cache" of the flex/hybrid branches
}
DEFAULT_FMAP = {8: "c8", 16: "c16", 32: "c32", 64: "c64", 128: "c128", 256: "c256", 512: "c512"}


def resolve_fmap(fmap: str | Mapping[int, int] | Sequence[int] | None, cache_size: int) -> tuple[int, ...]:
    """Return the merge slots (m_1, ..., m_L) after checking 1 <= m_1 < ... < m_L <= C-1.

    `fmap` is a preset name (FMAP_PRESETS), a mapping {level: slot} with levels exactly 1..L,
    a sequence of slots for levels 1..L, or None for the preset of this cache size.
    """
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 2:
        raise ValueError(f"cache size C must be an int >= 2, got {cache_size!r}")
    if fmap is None:
        if cache_size not in DEFAULT_FMAP:
            raise ValueError(
                f"no preset fmap for cache size C={cache_size} (presets exist for C in "
                f"{sorted(DEFAULT_FMAP)}); pass tele_fmap explicitly, e.g. a list of merge slots"
            )
        fmap = DEFAULT_FMAP[cache_size]
    if isinstance(fmap, str):
        if fmap not in FMAP_PRESETS:
            raise ValueError(f"unknown fmap preset {fmap!r}; known presets: {', '.join(FMAP_PRESETS)}")
        slots = FMAP_PRESETS[fmap]
    elif isinstance(fmap, Mapping):
        levels = sorted(fmap)
        if levels != list(range(1, len(levels) + 1)):
            raise ValueError(f"fmap levels must be exactly 1..L with no gaps, got levels {levels} in {dict(fmap)}")
        slots = tuple(fmap[level] for level in levels)
    elif isinstance(fmap, Sequence):
        slots = tuple(fmap)
    else:
        raise ValueError(f"fmap must be a preset name, a {{level: slot}} mapping or a slot list, got {fmap!r}")
    if not slots:
        raise ValueError("fmap must have at least one level")
    if not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool) for m in slots):
        raise ValueError(f"fmap slots must be ints, got {slots}")
    slots = tuple(int(m) for m in slots)
    if slots[0] < 1 or slots[-1] > cache_size - 1:
        raise ValueError(f"fmap slots must lie in [1, C-1] = [1, {cache_size - 1}], got {slots}")
    if any(b <= a for a, b in zip(slots, slots[1:])):
        raise ValueError(f"fmap slots must be strictly increasing, got {slots}")
    return slots


def merge_level(t: int) -> int:
    """Level l(t) = 1 + ctz(t) of step t >= 1 (the ruler sequence 1, 2, 1, 3, 1, 2, 1, 4, ...)."""
    return (t & -t).bit_length()


def merge_slot(t: int, fmap: tuple[int, ...]) -> int | None:
    """The slot that step t merges into, or None when step t drops the oldest slot (and at t=0)."""
    if t == 0:
        return None
    level = merge_level(t)
    return fmap[level - 1] if level <= len(fmap) else None


def window(cache_size: int, fmap: tuple[int, ...]) -> int:
    """Largest number of tokens the C slots cover; older tokens are evicted."""
    span = fmap[0] + sum((fmap[i] - fmap[i - 1]) * 2**i for i in range(1, len(fmap)))
    return span + (cache_size - fmap[-1]) * 2 ** len(fmap)


@dataclass(frozen=True)
class Schedule:
    """The merge schedule of n steps, over a node array [EMPTY, token 0..n-1, merges by depth].

    table[t, c]: node in slot c after step t (0 = EMPTY). passes[i] = (newer, older): the children
    of the nodes of depth i+2, which occupy one contiguous block of ids right after depth i+1.
    A node is in some slot exactly for steps birth <= t < death. first/last: its token range.
    """

    n: int
    cache_size: int
    fmap: tuple[int, ...]
    table: np.ndarray  # [n, C] int64
    passes: tuple[tuple[np.ndarray, np.ndarray], ...]
    birth: np.ndarray  # [N] (EMPTY: n, never alive)
    death: np.ndarray  # [N]
    first: np.ndarray  # [N] first token of the node's range (EMPTY: -1)
    last: np.ndarray  # [N] last token
    num_empty: np.ndarray  # [n] EMPTY slots after step t

    @property
    def num_nodes(self) -> int:
        return len(self.birth)


@functools.lru_cache(maxsize=64)
def build_schedule(n: int, cache_size: int, fmap: tuple[int, ...]) -> Schedule:
    """Simulate the per-step rule of spec §2 over node ids (pure Python, once per (n, C, fmap))."""
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    fmap = resolve_fmap(fmap, cache_size)
    # raw ids in creation order; raw 0 = EMPTY
    depth, first, last, birth, children = [0], [-1], [-1], [n], [(0, 0)]
    token_raw = np.empty(n, dtype=np.int64)
    slots = [0] * cache_size
    raw_table = np.empty((n, cache_size), dtype=np.int64)
    for t in range(n):
        token_raw[t] = len(depth)
        depth.append(1), first.append(t), last.append(t), birth.append(t), children.append((0, 0))
        m = merge_slot(t, fmap)
        if m is None:
            slots = [token_raw[t]] + slots[:-1]
        else:
            a, b = slots[m - 1], slots[m]  # a newer, b older
            if a == 0 or b == 0:
                merged = a or b  # EMPTY is the identity: reuse the other node
            else:
                merged = len(depth)
                depth.append(1 + max(depth[a], depth[b])), first.append(first[b]), last.append(last[a])
                birth.append(t), children.append((a, b))
            slots = [token_raw[t]] + slots[: m - 1] + [merged] + slots[m + 1 :]
        raw_table[t] = slots

    depth_a = np.asarray(depth)
    # flat order: EMPTY, tokens by position, then merged nodes sorted by (depth, creation)
    merged_raw = np.nonzero(depth_a >= 2)[0]
    merged_raw = merged_raw[np.argsort(depth_a[merged_raw], kind="stable")]
    order = np.concatenate([[0], token_raw, merged_raw])
    flat_of_raw = np.empty(len(depth), dtype=np.int64)
    flat_of_raw[order] = np.arange(len(order))
    table = flat_of_raw[raw_table]

    death = np.zeros(len(order), dtype=np.int64)
    for t in range(n):  # last step each node is seen, + 1
        death[table[t]] = t + 1
    death[0] = n
    kids = np.asarray(children)[order]
    flat_depth = depth_a[order]
    passes = []
    for d in range(2, int(flat_depth.max()) + 1):
        ids = np.nonzero(flat_depth == d)[0]
        passes.append((flat_of_raw[kids[ids, 0]], flat_of_raw[kids[ids, 1]]))
    return Schedule(
        n=n,
        cache_size=cache_size,
        fmap=fmap,
        table=table,
        passes=tuple(passes),
        birth=np.asarray(birth)[order],
        death=death,
        first=np.asarray(first)[order],
        last=np.asarray(last)[order],
        num_empty=(table == 0).sum(1),
    )


class TelePlan:
    """A Schedule's tensors on one device (plus the flex block mask when that path is used).

    Plain class on purpose: FSDP2 leaves it alone when it is passed into blocks as a kwarg.
    """

    def __init__(self, sched: Schedule, device: torch.device, flex: bool, flex_block_q: int | None = None):
        long = functools.partial(torch.as_tensor, dtype=torch.long, device=device)
        self.n = sched.n
        self.num_nodes = sched.num_nodes
        self.table = long(sched.table)
        self.passes = tuple((long(a), long(b)) for a, b in sched.passes)
        # log(#EMPTY slots) per query (-inf where none) for the flex path's sink correction
        log_k = np.where(sched.num_empty > 0, np.log(np.maximum(sched.num_empty, 1)), -np.inf)
        self.log_num_empty = {
            dt: torch.as_tensor(log_k, dtype=dt, device=device) for dt in (torch.float32, torch.float64)
        }
        self.block_mask = self.layout = None
        self.score_mods: dict = {}  # flex score_mods for eager callers (telescoping_flex)
        if flex:
            from avengers.models.telescoping_flex import build_block_mask, node_layout

            self.layout = node_layout(sched, flex_block_q, device)
            self.block_mask = build_block_mask(self, self.layout)


_PLANS: dict[tuple, TelePlan] = {}


FLEX_BLOCK_Q = 128  # flex column runs per 128 queries (telescoping_flex.node_layout); None: node array


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
        _PLANS[key] = TelePlan(build_schedule(n, cache_size, fmap), device, flex, flex_block_q)
    return _PLANS[key]


# ----------------------------------------------------------------------------------------------
# Functional forms
# ----------------------------------------------------------------------------------------------


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64: merges, log-masses and norms never run in half."""
    return torch.promote_types(dtype, torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, h, d] rotated in adjacent pairs at `positions` [T], ibm-fms's angles (fp32).

    Returns compute_dtype(x.dtype): keys are merged in full precision.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device)[: d // 2].float() / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    dt = compute_dtype(x.dtype)
    cos, sin = angles.cos().to(dt)[:, None, :], angles.sin().to(dt)[:, None, :]
    pairs = x.to(dt).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """g * x / rms(x) over the last dim, in compute_dtype; RMSNorm(0) = 0 keeps EMPTY at 0."""
    xf = x.to(compute_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return out if weight is None else out * weight.to(out.dtype)


def wisq_gate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """w_t = logsumexp over a KV head's query group of q_t . k_t / sqrt(d); q [B,T,H,d], k [B,T,Hkv,d]."""
    B, T, H, d = q.shape
    Hkv = k.shape[2]
    qg = q.to(k.dtype).view(B, T, Hkv, H // Hkv, d)
    return torch.logsumexp((qg * k.unsqueeze(3)).sum(-1) * d**-0.5, dim=-1)


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


def _softcap(s: torch.Tensor, cap: float | None) -> torch.Tensor:
    return s if cap is None else cap * torch.tanh(s / cap)


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
    telescoping_flex.flex_attention_nodes.
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
    s = _softcap(s.to(compute_dtype(s.dtype)), opts.softcap)
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
        from avengers.models.telescoping_flex import flex_attention_nodes

        out = flex_attention_nodes(q, K, V, plan, opts)
    elif impl == "gather":
        out = gather_attention(q, K, V, plan, opts)
    else:
        raise ValueError(f"impl must be 'gather' or 'flex', got {impl!r}")
    return out.to(q.dtype), nodes


class TelescopingState:
    """One layer's decode state: slot means k, v [B, Hkv, C, d] and log-masses [B, Hkv, C].

    Logical order (slot 0 newest). The step counter is the cache's seq_len, shared by the batch.
    """

    def __init__(self, batch_size: int, kv_heads: int, cache_size: int, head_dim: int, device=None, dtype=None):
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(batch_size, kv_heads, cache_size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.log_mass = torch.full(
            (batch_size, kv_heads, cache_size), EMPTY_LOG_MASS, device=device, dtype=compute_dtype(dtype)
        )

    def load_nodes(self, nodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ids: torch.Tensor) -> None:
        """Set the slots to the nodes `ids` [C] of a parallel pass (its last table row)."""
        K, V, W = nodes
        self.k.copy_(K[:, :, ids])
        self.v.copy_(V[:, :, ids])
        self.log_mass.copy_(W[:, :, ids])

    def push(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, slot: int | None) -> None:
        """One step: merge slots slot-1, slot into slot (or drop the oldest), shift, insert (k, v, w).

        k, v [B, Hkv, d]; w [B, Hkv]. Vectorised over slots (one concatenation per tensor).
        """
        K, V, W = self.k, self.v, self.log_mass
        dt = W.dtype
        new = (k.to(K.dtype).unsqueeze(2), v.to(V.dtype).unsqueeze(2), w.to(dt).unsqueeze(2))
        if slot is None:
            parts = [(n, x[:, :, :-1]) for n, x in zip(new, (K, V, W))]
        else:
            wa, wb = W[:, :, slot - 1], W[:, :, slot]
            wn = torch.logaddexp(wa, wb)
            pa, pb = torch.exp(wa - wn).unsqueeze(-1), torch.exp(wb - wn).unsqueeze(-1)
            # EMPTY + x = x exactly, EMPTY + EMPTY stays at the sentinel
            wn = torch.where(wb <= EMPTY_THRESHOLD, wa, torch.where(wa <= EMPTY_THRESHOLD, wb, wn))
            merged = [(pa * x[:, :, slot - 1].to(dt) + pb * x[:, :, slot].to(dt)).to(x.dtype) for x in (K, V)]
            merged.append(wn)
            parts = [
                (n, torch.cat([x[:, :, : slot - 1], m.unsqueeze(2), x[:, :, slot + 1 :]], 2))
                for n, m, x in zip(new, merged, (K, V, W))
            ]
        for (n, rest), x in zip(parts, (K, V, W)):
            x.copy_(torch.cat([n, rest], 2))


class StepTables:
    """Device tables that make one decode step branch-free (CUDA-graph safe).

    Step t reads an extended slot array ext = [new token, old slot 0, ..., old slot C-1].
    Its action a = min(ctz(t), L) (a = L at t = 0) picks row a: new slot c takes ext[src_a[a, c]],
    fused with ext[src_b[a, c]] where merge[a, c] (only c = m_{a+1}); a = L is the drop step.
    """

    def __init__(self, cache_size: int, fmap: tuple[int, ...], device: torch.device):
        L, C = len(fmap), cache_size
        src_a = np.tile(np.arange(C), (L + 1, 1))  # drop: new slot c <- ext[c]
        src_b = src_a.copy()
        merge = np.zeros((L + 1, C), dtype=bool)
        for a, m in enumerate(fmap):
            row = np.arange(C)
            row[m + 1 :] += 1  # slots above m stay where they were: old c = ext[c + 1]
            src_a[a], src_b[a] = row, row
            src_b[a, m] = m + 1
            merge[a, m] = True
        self.src_a = torch.as_tensor(src_a, device=device)
        self.src_b = torch.as_tensor(src_b, device=device)
        self.merge = torch.as_tensor(merge, device=device)
        self.pow2 = torch.as_tensor([2**k for k in range(1, L + 1)], device=device)

    def action(self, position: torch.Tensor) -> torch.Tensor:
        """min(ctz(t), L) for a 0-dim long position t (L for t = 0), on the device."""
        return (position.view(1) % self.pow2 == 0).sum().view(1)


_STEP_TABLES: dict[tuple, StepTables] = {}


def step_tables(cache_size: int, fmap: tuple[int, ...], device: torch.device) -> StepTables:
    key = (cache_size, fmap, str(device))
    if key not in _STEP_TABLES:
        _STEP_TABLES[key] = StepTables(cache_size, fmap, device)
    return _STEP_TABLES[key]


def push_at(
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    position: torch.Tensor,
    tables: StepTables,
) -> None:
    """TelescopingState.push on a state's slot means K, V and log-masses W (updated in place) for
    the step at a device-side position (no host sync, graph-safe)."""
    a = tables.action(position)
    src_a, src_b = tables.src_a.index_select(0, a)[0], tables.src_b.index_select(0, a)[0]
    merge = tables.merge.index_select(0, a)[0]
    dt = W.dtype
    ext_w = torch.cat([w.to(dt).unsqueeze(2), W], 2)
    wa, wb = ext_w.index_select(2, src_a), ext_w.index_select(2, src_b)
    wn = torch.logaddexp(wa, wb)
    pa = torch.where(merge, torch.exp(wa - wn), 1.0).unsqueeze(-1)
    pb = torch.where(merge, torch.exp(wb - wn), 0.0).unsqueeze(-1)
    fused_w = torch.where(wb <= EMPTY_THRESHOLD, wa, torch.where(wa <= EMPTY_THRESHOLD, wb, wn))
    for x, new in ((K, k), (V, v)):
        ext = torch.cat([new.to(x.dtype).unsqueeze(2), x], 2).to(dt)
        x.copy_(pa * ext.index_select(2, src_a) + pb * ext.index_select(2, src_b))
    W.copy_(torch.where(merge, fused_w, wa))


def slot_attention(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    log_mass: torch.Tensor,
    opts: TeleOptions,
    k_gain: torch.Tensor | None = None,
    v_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recurrent read-out for one query per sequence: q [B, H, d] over a state's C slots (means K,
    V, log-masses log_mass) -> [B, H, d]."""
    B, H, d = q.shape
    Hkv = K.shape[1]
    if opts.kv_norm:
        K, V = rms_norm(K, k_gain), rms_norm(V, v_gain)
    dt = compute_dtype(q.dtype)
    qg = q.to(dt).view(B, Hkv, H // Hkv, d)
    s = _softcap(torch.einsum("bhed,bhcd->bhec", qg, K.to(dt)) * d**-0.5, opts.softcap)
    if opts.mask_empty:
        s = s.masked_fill((log_mass <= EMPTY_THRESHOLD).unsqueeze(2), float("-inf"))
    out = torch.einsum("bhec,bhcd->bhed", torch.softmax(s, -1), V.to(dt))
    return out.reshape(B, H, d).to(q.dtype)


def step_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    tables: StepTables,
    opts: TeleOptions,
    theta: float,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """A decode step between the projections: q [B, 1, H, d], k, v [B, 1, H_kv, d] as projected (k
    and q not yet rotated), gate logits w [B, 1, H_kv] (None: the WISQ gate) at the 0-dim device
    position -> rotate, push into the slots (K, V, W, in place), read out: [B, H, d]. A pure function
    of tensors, so that one torch.compile serves every layer (compiled_step_core)."""
    q, k = rope(q, position.view(1), theta), rope(k, position.view(1), theta)
    if w is None:
        w = wisq_gate(q, k)
    push_at(K, V, W, k[:, 0], v[:, 0], w[:, 0], position, tables)
    return slot_attention(q[:, 0].to(v.dtype), K, V, W, opts, k_gain, v_gain)


@functools.cache
def compiled_step_core():
    """step_core through torch.compile (the decode step's ~40 small kernels per layer fused into a
    few); used by TelescopingAttention.step under llama_compiled's "inductor" decode mode."""
    return torch.compile(step_core, fullgraph=True)


def fused_qkv_step_core(
    qkv: torch.Tensor,
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    gate_w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    tables: StepTables,
    opts: TeleOptions,
    theta: float,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """step_core from a fused QKV GEMV's output qkv [B, (H + 2 H_kv) d] (in_proj's row order) and the
    block input h [B, D], whose normalised form the linear gate reads (gate_w None: WISQ gate)."""
    B, (Hkv, d) = qkv.shape[0], (K.shape[1], K.shape[-1])
    q, k, v = qkv.view(B, 1, -1, d).split([qkv.shape[1] // d - 2 * Hkv, Hkv, Hkv], dim=2)
    w = None
    if gate_w is not None:
        dt = compute_dtype(h.dtype)
        w = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps).to(dt), gate_w.to(dt)).view(B, 1, Hkv)
    return step_core(q, k, v, w, position, K, V, W, tables, opts, theta, k_gain, v_gain)


@functools.cache
def compiled_fused_qkv_step_core():
    return torch.compile(fused_qkv_step_core, fullgraph=True)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


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

    def prefill(self, x: torch.Tensor, state: TelescopingState) -> torch.Tensor:
        """Parallel form over positions 0..P-1, then the state of table row P-1."""
        plan = self.plan(x.shape[1], x.device)
        out, nodes = self._parallel(x, plan)
        state.load_nodes(nodes, plan.table[-1])
        return out

    def step(self, x: torch.Tensor, state: TelescopingState, position: torch.Tensor) -> torch.Tensor:
        """Recurrent form for one token: x [B, 1, d_model] at the 0-dim long device `position`.

        No host synchronisation, so the step can be captured in a CUDA graph.
        """
        B = x.shape[0]
        tables = step_tables(self.opts.cache_size, self.opts.fmap, x.device)
        core = compiled_step_core() if compiled_step_cores() else step_core
        out = core(
            *self._project_raw(x),
            position,
            state.k,
            state.v,
            state.log_mass,
            tables,
            self.opts,
            self.rope_theta,
            *self._gains(),
        )
        return self.dense(out.reshape(B, 1, self.nheads * self.emb_v_per_head))


# ----------------------------------------------------------------------------------------------
# Llama integration
# ----------------------------------------------------------------------------------------------

HYBRID_PRESETS = {  # full-attention layer choices of the hybrid branches (spec §1), for nlayers
    "first4": lambda nl: tuple(range(min(4, nl))),
    "2and2": lambda nl: tuple(sorted({0, 1, nl - 2, nl - 1})),
    "1/6@1": lambda nl: tuple(range(0, nl, 6)),
    "1/6@4": lambda nl: tuple(range(3, nl, 6)),
}


@dataclass
class TeleLlamaConfig(LLaMAConfig):
    """LLaMAConfig plus the telescoping options (the tele_* fields)."""

    tele_cache_size: int = 128
    tele_fmap: Any = None  # preset name, {level: slot}, slot list, or None = preset for the cache size
    tele_gate: str = "linear"
    tele_mask_empty: bool = False
    tele_softcap: float | None = None
    tele_kv_norm: bool = True
    tele_full_attn_layers: Any = field(default_factory=tuple)  # layer indices or a HYBRID_PRESETS name
    tele_impl: str = "auto"  # "auto" (flex for CUDA training, gather otherwise) | "gather" | "flex"

    def tele_options(self) -> TeleOptions:
        return TeleOptions(
            self.tele_cache_size,
            resolve_fmap(self.tele_fmap, self.tele_cache_size),
            self.tele_gate,
            self.tele_mask_empty,
            self.tele_softcap,
            self.tele_kv_norm,
        )

    def full_attn_layers(self) -> tuple[int, ...]:
        spec = self.tele_full_attn_layers
        if isinstance(spec, str):
            if spec not in HYBRID_PRESETS:
                raise ValueError(
                    f"unknown tele_full_attn_layers preset {spec!r}; known: {', '.join(HYBRID_PRESETS)} "
                    "or a list of layer indices"
                )
            return HYBRID_PRESETS[spec](self.nlayers)
        layers = tuple(int(i) for i in spec)
        bad = [i for i in layers if not 0 <= i < self.nlayers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"tele_full_attn_layers must be distinct indices in [0, {self.nlayers}), got {layers}")
        return tuple(sorted(layers))

    def validate(self) -> None:
        self.tele_options()
        self.full_attn_layers()
        kv = self.kvheads or self.nheads
        if self.nheads % kv:
            raise ValueError(f"nheads={self.nheads} must be a multiple of kvheads={kv}")
        if self.tele_impl not in ("auto", "gather", "flex"):
            raise ValueError(f"tele_impl must be 'auto', 'gather' or 'flex', got {self.tele_impl!r}")
        if (self.rope_scaling or {}).get("rope_type", "regular") != "regular":
            raise ValueError(
                f"telescoping layers support rope_type 'regular' only, got {self.rope_scaling.get('rope_type')!r}"
            )


class TelescopingLlama(Llama):
    """ibm-fms LLaMA whose attention (except tele_full_attn_layers) is TelescopingAttention."""

    def __init__(self, config: TeleLlamaConfig):
        config.validate()
        super().__init__(config)
        opts = config.tele_options()
        self.full_layers = frozenset(config.full_attn_layers())
        for i, layer in enumerate(self.base_model.layers):
            if i not in self.full_layers:
                layer.attn = TelescopingAttention(
                    config.emb_dim,
                    config.nheads,
                    config.kvheads or config.nheads,
                    opts,
                    config.rope_theta,
                    impl=config.tele_impl,
                    use_bias=config.attn_bias,
                    fused=config.fused_weights,
                    linear_config=config.linear_config,
                )

    def _tele_layers(self) -> list[TelescopingAttention]:
        return [l.attn for i, l in enumerate(self.base_model.layers) if i not in self.full_layers]

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if kwargs:
            raise TypeError(f"TelescopingLlama.forward takes input_ids and cache= only, got {sorted(kwargs)}")
        if cache is not None:
            return self._forward_cached(x, cache)
        tele = self._tele_layers()
        plan = tele[0].plan(x.shape[1], x.device) if tele else None
        h = self.base_model.embedding(x)
        for i, layer in enumerate(self.base_model.layers):
            h = layer(h) if i in self.full_layers else layer(h, tele_plan=plan)
        return self.head(self.base_model.dec_norm(h))

    def allocate_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> InferenceCache:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size and max_seq_len must be >= 1, got {batch_size} and {max_seq_len}")
        cfg = self.config
        param = next(self.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        kv, d = cfg.kvheads or cfg.nheads, cfg.emb_dim // cfg.nheads
        layers = [
            KVState(batch_size, kv, padded_len(max_seq_len), d, device=device, dtype=dtype)
            if i in self.full_layers
            else TelescopingState(batch_size, kv, cfg.tele_cache_size, d, device=device, dtype=dtype)
            for i in range(cfg.nlayers)
        ]
        return InferenceCache(layers, batch_size, max_seq_len)

    def _forward_cached(self, x: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids must be [batch={cache.batch_size}, T], got {tuple(x.shape)}")
        start, T = cache.seq_len, x.shape[1]
        if start + T > cache.max_seq_len:
            raise ValueError(f"cache holds max_seq_len={cache.max_seq_len} tokens; {start} used, {T} more given")
        if start == 0:  # empty cache: prefill through the parallel form
            logits = self._cached_chunk(x, cache, None)
        else:  # existing state: one recurrent step per token, position read on the device
            logits = torch.cat([self._cached_chunk(x[:, i : i + 1], cache, cache.position + i) for i in range(T)], 1)
        cache.advance(T)
        return logits

    def _cached_chunk(self, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor | None) -> torch.Tensor:
        """Prefill (position None: tokens 0..T-1) or one decode step at a device position."""
        if position is not None and self._triton_step_applies(x.shape[0]):
            return self._triton_step(x, cache, position)
        base = self.base_model
        h = base.embedding(x)
        for layer, state in zip(base.layers, cache.layers):
            y = layer.ln(h)
            if isinstance(state, KVState):
                a = full_attention_cached(layer.attn, y, state, position, self.config.rope_theta)
            elif position is None:
                a = layer.attn.prefill(y, state)
            else:
                a = layer.attn.step(y, state, position)
            h = h + a
            h = h + layer.ff_sub_layer(layer.ff_ln(h))
        return self.head(base.dec_norm(h))

    def _triton_step_applies(self, batch: int) -> bool:
        """The "triton" decode mode's path: telescoping layers only, Llama's block layout, batch 1."""
        return triton_gemv_step(batch) and self._gemv_layout

    @functools.cached_property
    def _gemv_layout(self) -> bool:  # the layout is fixed at build: not re-checked every decode step
        return not self.full_layers and all(llama_compiled.eligible(layer) for layer in self.base_model.layers)

    def _triton_step(self, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor) -> torch.Tensor:
        """One decode step with the projections as the Triton GEMVs of Llama's "triton" path: per block
        RMSNorm + QKV as one GEMV, the slot update and read-out (fused_qkv_step_core), then Wo +
        residual, RMSNorm + gate/up + SwiGLU, W2 + residual (triton_gemv.decode_post); the final
        norm + LM head as one GEMV."""
        from avengers.inference import triton_gemv

        base, B = self.base_model, x.shape[0]
        h = base.embedding(x)
        opts = base.layers[0].attn.opts
        tables = step_tables(opts.cache_size, opts.fmap, x.device)
        # torch.compile on CUDA, as the "inductor" mode does; the plain function on the CPU (interpreter tests)
        core = compiled_fused_qkv_step_core() if x.is_cuda else fused_qkv_step_core
        for layer, state in zip(base.layers, cache.layers):
            attn, ff = layer.attn, layer.ff_sub_layer
            qkv = triton_gemv.gemv(
                h.view(B, -1), attn.in_proj.qkv_fused.weight, norm_weight=layer.ln.weight, eps=layer.ln.eps
            )
            out = core(
                qkv,
                h.view(B, -1),
                layer.ln.weight,
                layer.ln.eps,
                attn.gate.weight if attn.gate is not None else None,
                position,
                state.k,
                state.v,
                state.log_mass,
                tables,
                attn.opts,
                attn.rope_theta,
                *attn._gains(),
            )
            h = triton_gemv.decode_post(
                h,
                out.reshape(B, 1, -1),
                attn.dense.weight,
                layer.ff_ln.weight,
                layer.ff_ln.eps,
                ff.wg1_fused.weight,
                ff.w2.weight,
                ff.hidden_dim,
            )
        return llama_compiled.decode_head(base.dec_norm, self.head, h)  # a GEMV: this path serves batch 1 only


def full_attention_cached(
    attn: MultiHeadAttention, y: torch.Tensor, state: KVState, position: torch.Tensor | None, theta: float
) -> torch.Tensor:
    """A hybrid model's full-attention layer over a KVState: prefill (position None) or one step."""
    B, T, _ = y.shape
    q, k, v = attn.in_proj(y, None, None)
    pos = torch.arange(T, device=y.device) if position is None else position.view(1)
    q = rope(q.view(B, T, attn.nheads, attn.emb_kq_per_head), pos, theta).to(v.dtype).transpose(1, 2)
    k = rope(k.view(B, T, attn.kvheads, attn.emb_kq_per_head), pos, theta).to(state.k.dtype).transpose(1, 2)
    v = v.view(B, T, attn.kvheads, attn.emb_v_per_head).to(state.v.dtype).transpose(1, 2)
    if position is None:
        keys, values = state.update(k, v, 0)
        group = attn.nheads // attn.kvheads
        keys, values = keys.repeat_interleave(group, 1).to(q.dtype), values.repeat_interleave(group, 1).to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True).transpose(1, 2)
    else:
        state.write_at(k, v, position)
        out = decode_attention(q[:, :, 0], state.k, state.v, position + 1).to(q.dtype).unsqueeze(1)
    return attn.dense(out.reshape(B, T, attn.nheads * attn.emb_v_per_head))


def tele_flops_per_token(cfg: TeleLlamaConfig, seq_len: int) -> float:
    """6 * matmul params (incl. gates) + 12 * d_attn * (full layers * seq_len + tele layers * min(C, seq_len)).

    Each telescoping query attends exactly C entries (EMPTY sinks included), so its scores and
    values cost 2*2*C*d_attn FLOPs forward, x3 with backward. Merges and norms (elementwise,
    O(d) per node) are not counted, like Llama's norms.
    """
    _, matmul_params = llama_param_counts(cfg)
    n_full = len(cfg.full_attn_layers())
    n_tele = cfg.nlayers - n_full
    gate = n_tele * cfg.emb_dim * (cfg.kvheads or cfg.nheads) if cfg.tele_gate == "linear" else 0
    attn = 12 * cfg.emb_dim * (n_full * seq_len + n_tele * min(cfg.tele_cache_size, seq_len))
    return 6 * (matmul_params + gate) + attn


def tele_cache_bytes(cfg: TeleLlamaConfig, context: int, dtype_bytes: int = 2) -> int:
    """Decode state bytes per sequence: 2*C*Hkv*d means + C*Hkv fp32 log-masses per tele layer."""
    kv, d = cfg.kvheads or cfg.nheads, cfg.emb_dim // cfg.nheads
    n_full = len(cfg.full_attn_layers())
    tele = (cfg.nlayers - n_full) * (2 * cfg.tele_cache_size * kv * d * dtype_bytes + cfg.tele_cache_size * kv * 4)
    return tele + n_full * 2 * context * kv * d * dtype_bytes


def _tele_spec(name: str, base: str, description: str, **changes) -> ModelSpec:
    base_cfg = get_model_spec(base).config
    values = {f.name: getattr(base_cfg, f.name) for f in dataclasses.fields(LLaMAConfig)}
    values.update(changes)
    cfg = TeleLlamaConfig(**values)
    cfg.validate()
    return register(
        ModelSpec(
            name=name,
            family="telescoping",
            config=cfg,
            build_fn=TelescopingLlama,
            block_types=(LLaMABlock,),
            flops_fn=tele_flops_per_token,
            vocab_size=cfg.src_vocab_size,
            max_seq_len=cfg.max_expected_seq_len,
            description=description,
        )
    )


_tele_spec(
    "tele64_llama2_1.4b", "llama2_1.4b", "Tele@64 on the Llama-2 1.4B shape (published comparison)", tele_cache_size=64
)
for _sfx in ("", "_4k"):
    _tele_spec(
        f"tele128_llama3_1.8b{_sfx}",
        f"llama3_1.8b{_sfx}",
        "Tele@128 Llama-3 1.8B as published: 32 heads / 2 KV heads (d=64), FFN x3.75",
        tele_cache_size=128,
        nheads=32,
        kvheads=2,
        hidden_grow_factor=3.75,
    )
    for _shape in ("8b", "3.2b", "70b"):
        _tele_spec(
            f"tele128_llama3_{_shape}{_sfx}",
            f"llama3_{_shape}{_sfx}",
            f"Tele@128 on the llama3_{_shape}{_sfx} shape (its own head layout)",
            tele_cache_size=128,
        )
_tele_spec("tele128_llama3_194m_4k", "llama3_194m_4k", "Tele@128 on the llama3_194m_4k shape", tele_cache_size=128)
_tele_spec(
    "tele_tiny",
    "llama3_tiny",
    f"CPU demo/test telescoping model (C=16, fmap c16, vocab {TINY_VOCAB})",
    tele_cache_size=16,
)
