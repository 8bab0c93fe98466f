"""Memory-efficient telescoping read-out: flex_attention over the node array with a block mask.

Instead of gathering the C nodes of every query ([B, n, C, Hkv, d], the reference in
telescoping.gather_attention), every query attends to the whole node array [B, Hkv, N, d] under
a mask that is True exactly where node j sits in one of query t's slots. A node occupies a slot
for one contiguous run of steps, birth_j <= t < death_j, so the mask is two comparisons against
O(N) integers and never exists as an [n, N] tensor. Nodes are laid out by depth and, within a
depth, by creation time, so the live nodes of each depth form a narrow diagonal band and the
128x128 block mask is sparse (a few blocks per depth per query block).

EMPTY slots. The documented version does not mask them: each EMPTY slot adds a logit 0 with a
value 0. All EMPTY slots are the same node (index 0, K̂ = V̂ = 0), so the k EMPTY slots of query
t are reproduced exactly by attending once to node 0 with the score bias log(k): exp(0 + log k)
= k * exp(0). Node 0 is masked out where k = 0 and always with mask_empty.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from avengers.models.telescoping import TeleOptions, TelePlan, compute_dtype


def _mask_mod(plan: TelePlan, mask_empty: bool):
    birth, death, num_empty = plan.birth, plan.death, plan.num_empty

    def mask_mod(b, h, q_idx, kv_idx):
        alive = (birth[kv_idx] <= q_idx) & (q_idx < death[kv_idx])
        if mask_empty:
            return alive
        return alive | ((kv_idx == 0) & (num_empty[q_idx] > 0))

    return mask_mod


def build_block_mask(plan: TelePlan, mask_empty: bool) -> BlockMask:
    """Block mask [n queries, N nodes] (shared by batch and heads), built on the plan's device."""
    device = plan.table.device
    return create_block_mask(_mask_mod(plan, mask_empty), None, None, plan.n, plan.num_nodes,
                             device=str(device))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    """Compiled flex_attention on CUDA (fused kernel); eager (dense reference math) elsewhere."""
    if device.type == "cuda":
        return _compiled_flex()
    return flex_attention


def _score_mod(log_empty: torch.Tensor, softcap: float | None, mask_empty: bool):
    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if not mask_empty:  # node 0 stands for all EMPTY slots of the query: bias log(#EMPTY)
            score = score + torch.where(kv_idx == 0, log_empty[q_idx], 0.0).to(score.dtype)
        return score

    return score_mod


def flex_attention_nodes(q: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor, plan: TelePlan,
                         opts: TeleOptions) -> torch.Tensor:
    """q [B, n, H, d] over the node array k_hat, v_hat [B, Hkv, N, d] (normed) -> [B, n, H, d]."""
    if plan.block_mask is None:
        raise ValueError("this TelePlan was built without a block mask; get it with flex=True")
    B, n, H, d = q.shape
    dt = compute_dtype(q.dtype)
    # plain [B, heads, len, d] buffers: inductor's CPU flex template reads the input layouts
    qf = q.transpose(1, 2).contiguous()
    kf, vf = k_hat.to(q.dtype), v_hat.to(q.dtype)
    kwargs = dict(block_mask=plan.block_mask, scale=d**-0.5, enable_gqa=H != kf.shape[1])
    log_empty = plan.log_empty[dt]
    if torch.compiler.is_compiling():  # inside a compiled block: traced into its graph
        out = flex_attention(qf, kf, vf, score_mod=_score_mod(log_empty, opts.softcap, opts.mask_empty), **kwargs)
    else:
        # eager caller: reuse one score_mod per (plan, options) so the compiled kernel is not
        # recompiled for every new closure object
        key = (opts.softcap, opts.mask_empty, dt)
        if key not in plan.score_mods:
            plan.score_mods[key] = _score_mod(log_empty, opts.softcap, opts.mask_empty)
        with warnings.catch_warnings():  # eager CPU flex warns that it is the unfused reference
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = _flex(q.device)(qf, kf, vf, score_mod=plan.score_mods[key], **kwargs)
    return out.transpose(1, 2)
