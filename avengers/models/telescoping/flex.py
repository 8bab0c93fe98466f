"""Memory-efficient telescoping read-out: flex_attention with a block mask over node columns.

Instead of gathering the C nodes of every query ([B, n, C, Hkv, d], the reference in
attention.gather_attention), queries attend to a set of node columns under a mask that is True
exactly where the column's node sits in one of query t's slots. A node occupies a slot for one
contiguous run of steps, birth <= t < death, so the mask is a few comparisons against O(columns)
integers and never exists as an [n, columns] tensor.

Column layout (NodeLayout). With `block_q=None` the columns are the node array itself (EMPTY, the
tokens, then merged nodes by depth); each depth's live nodes form a narrow diagonal band, but a
block of 128 queries still touches ~10 column blocks of 128 for Tele@128 at n=4096, mostly empty.
With `block_q=Q` every block of Q queries gets its own run of U columns holding just the nodes
any of its queries reads (padded with never-alive columns), gathered from the node array: the
block mask is block-diagonal with U/128 blocks per query block (3 for Tele@128: U = 384), and
the gathered copy is [B, Hkv, n/Q * U, d], about 3x the token count, not C x.

EMPTY slots. The documented version does not mask them: each EMPTY slot adds a logit 0 with a
value 0, so with k of them query t's output is the output over its live slots scaled by
Z / (Z + k), Z the live slots' softmax normaliser. flex returns log Z (return_lse, differentiable),
so the scale is sigmoid(lse - log k), applied outside the kernel: the mask holds live nodes only
and the kernel needs no per-query score bias (a bias read from a per-query table made the kernel
several times slower: experiments/README.md).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from avengers.models.telescoping.schedule import Schedule, TelePlan
from avengers.ops.telescoping import compute_dtype

BLOCK = 128  # flex_attention's block-mask granularity


@dataclass
class NodeLayout:
    """Which node each flex column holds and when it is alive. Columns come in runs of `width`;
    run i serves queries [i * block_q, (i + 1) * block_q)."""

    block_q: int
    width: int
    ids: torch.Tensor | None  # [runs * width] node ids, or None: the columns are the node array
    birth: torch.Tensor  # [columns] int32 (EMPTY and padding: never alive)
    death: torch.Tensor  # [columns] int32


def node_layout(sched: Schedule, block_q: int | None, device: torch.device) -> NodeLayout:
    n = sched.n
    i32 = functools.partial(torch.as_tensor, dtype=torch.int32, device=device)
    if block_q is None or block_q >= n:
        return NodeLayout(n, sched.num_nodes, None, i32(sched.birth), i32(sched.death))
    if block_q % BLOCK:
        raise ValueError(f"block_q must be a multiple of {BLOCK}, got {block_q}")
    runs = []
    for start in range(0, n, block_q):  # nodes alive for some query of this block (EMPTY never is)
        live = np.nonzero((sched.birth < start + block_q) & (sched.death > start))[0]
        runs.append(live[live != 0])
    width = -(-max(len(r) for r in runs) // BLOCK) * BLOCK
    ids = np.zeros((len(runs), width), dtype=np.int64)
    for i, r in enumerate(runs):
        ids[i, : len(r)] = r
    birth = np.where(ids == 0, n, sched.birth[ids])  # padding columns (id 0): never alive
    death = np.where(ids == 0, 0, sched.death[ids])
    return NodeLayout(
        block_q, width, torch.as_tensor(ids.ravel(), device=device), i32(birth.ravel()), i32(death.ravel())
    )


def _mask_mod(layout: NodeLayout):
    birth, death, width, block_q = layout.birth, layout.death, layout.width, layout.block_q

    def mask_mod(b, h, q_idx, kv_idx):
        same_run = kv_idx // width == q_idx // block_q
        return same_run & (birth[kv_idx] <= q_idx) & (q_idx < death[kv_idx])

    return mask_mod


def build_block_mask(n: int, layout: NodeLayout, device: torch.device) -> BlockMask:
    """Block mask [n queries, columns] (shared by batch and heads)."""
    return create_block_mask(_mask_mod(layout), None, None, n, len(layout.birth), device=str(device))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(device: torch.device):
    """Compiled flex_attention on CUDA (fused kernel); eager (dense reference math) elsewhere."""
    if device.type == "cuda":
        return _compiled_flex()
    return flex_attention


def _softcap_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


@torch.compiler.disable  # inductor's CPU flex has no return_lse: compiled CPU callers run it eagerly
def _flex_outside_graph(qf, kf, vf, plan: TelePlan, softcap: float | None, kwargs: dict):
    # one score_mod per soft cap, so the compiled kernel is not recompiled for every new closure
    if softcap is not None and softcap not in plan.score_mods:
        plan.score_mods[softcap] = _softcap_mod(softcap)
    with warnings.catch_warnings():  # eager CPU flex warns that it is the unfused reference
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex(qf.device)(qf, kf, vf, score_mod=plan.score_mods.get(softcap), **kwargs)


def flex_attention_nodes(
    q: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor, plan: TelePlan, opts
) -> torch.Tensor:
    """q [B, n, H, d] over the node array k_hat, v_hat [B, Hkv, N, d] (normed) -> [B, n, H, d]."""
    if plan.block_mask is None:
        raise ValueError("this TelePlan was built without a block mask; get it with flex=True")
    B, n, H, d = q.shape
    layout = plan.layout
    # [B, heads, n, d] as flex expects
    qf = q.transpose(1, 2).contiguous()
    kf, vf = k_hat.to(q.dtype), v_hat.to(q.dtype)
    if layout.ids is not None:
        kf, vf = kf.index_select(2, layout.ids), vf.index_select(2, layout.ids)
    kwargs = dict(block_mask=plan.block_mask, scale=d**-0.5, enable_gqa=H != kf.shape[1], return_lse=True)
    if torch.compiler.is_compiling() and q.device.type == "cuda":  # traced into the compiled block's graph
        score_mod = None if opts.softcap is None else _softcap_mod(opts.softcap)
        out, lse = flex_attention(qf, kf, vf, score_mod=score_mod, **kwargs)
    else:
        out, lse = _flex_outside_graph(qf, kf, vf, plan, opts.softcap, kwargs)
    if not opts.mask_empty:  # k EMPTY sinks of logit 0: scale by Z / (Z + k) = sigmoid(lse - log k)
        log_k = plan.log_num_empty[compute_dtype(q.dtype)]
        out = (out.to(lse.dtype) * torch.sigmoid(lse - log_k).unsqueeze(-1)).to(out.dtype)
    return out.transpose(1, 2)
