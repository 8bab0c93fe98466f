"""The telescoping decode step with a ring map: two slot writes per step instead of rewriting every
slot, against the decode path's step core (`avengers.decode.telescoping.step_core`).

    python experiments/gpu_tele_ring_step.py --out DIR [--variant tele128_llama3_1.8b] [--batches 1,64,4096]

Why: `push_at` keeps the slots in logical order, so every step shifts them: it reads and rewrites
the whole state (keys, values, log-masses) of every sequence and KV head. At batch 4096 the passes
over the slots are most of the step (docs/results.md, "What bounds the constant-cache families'
decode"). The read-out is a softmax over the slots, so their order does not matter; keeping them in
place with a [C] map from logical slot to physical cell (docs: the telescoping spec's "ring map")
leaves a step two writes: the merged pair into the cell of logical slot m, the new token into the
cell freed by slot m - 1 (or, at a drop step, into the cell of the oldest slot). The map, shared by
the batch and every layer, rotates its first m (or all C) entries: a C-element gather.

The script times one layer's compiled step core both ways (RoPE, gate, slot update, read-out) at
the variant's attention shape, in CUDA graphs of one step per layer over distinct states (so the L2
holds none of them), checks them against each other, and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuda_timing import graph_us, write_results  # noqa: E402

from avengers.decode.telescoping import slot_attention, step_core, step_tables  # noqa: E402
from avengers.ops.telescoping import EMPTY_THRESHOLD, rope, wisq_gate  # noqa: E402


class RingTables:
    """Per action a (min(ctz(t), L), as StepTables): the logical slot j whose cell takes the new
    token (m_a - 1 at a merge, C - 1 at the drop step), the logical slot m whose cell takes the
    merged pair (the drop step: j again, with no merge), and the new ring as a gather of the old
    one (entry 0 <- j, entries 1..j <- 0..j-1, the rest in place)."""

    def __init__(self, cache_size: int, fmap: tuple[int, ...], device: torch.device):
        L, C = len(fmap), cache_size
        j = np.array([m - 1 for m in fmap] + [C - 1])
        m = np.array(list(fmap) + [C - 1])
        perm = np.tile(np.arange(C), (L + 1, 1))
        for a, ja in enumerate(j):
            perm[a, : ja + 1] = np.roll(np.arange(ja + 1), 1)
        self.steps = step_tables(cache_size, fmap, device)  # its action() and pow2
        self.j = torch.as_tensor(j, device=device)
        self.m = torch.as_tensor(m, device=device)
        self.merge = torch.as_tensor(np.arange(L + 1) < L, device=device)
        self.perm = torch.as_tensor(perm, device=device)


def ring_push(K, V, W, ring, k, v, w, position, tables: RingTables) -> None:
    """push_at's step on slots kept in place: K, V [B, H_kv, C, d] and log-masses W [B, H_kv, C]
    indexed by physical cell, ring [C] (logical slot -> cell) updated in place; k, v [B, H_kv, d],
    w [B, H_kv] at the 0-dim device position. Graph-safe (no host sync)."""
    a = tables.steps.action(position)
    merge = tables.merge.index_select(0, a)
    new_cell = ring.index_select(0, tables.j.index_select(0, a))  # [1]
    merge_cell = ring.index_select(0, tables.m.index_select(0, a))  # == new_cell at the drop step
    dt = W.dtype
    wa, wb = W.index_select(2, new_cell), W.index_select(2, merge_cell)  # slots m - 1 and m
    wn = torch.logaddexp(wa, wb)
    pa, pb = torch.exp(wa - wn).unsqueeze(-1), torch.exp(wb - wn).unsqueeze(-1)
    fused_w = torch.where(wb <= EMPTY_THRESHOLD, wa, torch.where(wa <= EMPTY_THRESHOLD, wb, wn))
    for x, new in ((K, k), (V, v)):
        xa, xb = x.index_select(2, new_cell).to(dt), x.index_select(2, merge_cell).to(dt)
        x.index_copy_(2, merge_cell, torch.where(merge, pa * xa + pb * xb, xb).to(x.dtype))
        x.index_copy_(2, new_cell, new.to(x.dtype).unsqueeze(2))
    W.index_copy_(2, merge_cell, torch.where(merge, fused_w, wb))
    W.index_copy_(2, new_cell, w.to(dt).unsqueeze(2))
    ring.copy_(ring.index_select(0, tables.perm.index_select(0, a)[0]))


def ring_step_core(q, k, v, w, position, K, V, W, ring, tables: RingTables, opts, theta, k_gain, v_gain):
    """step_core with ring_push: q [B, 1, H, d], k, v [B, 1, H_kv, d], gate logits w [B, 1, H_kv]
    (None: the WISQ gate) -> [B, H, d]."""
    q, k = rope(q, position.view(1), theta), rope(k, position.view(1), theta)
    if w is None:
        w = wisq_gate(q, k)
    ring_push(K, V, W, ring, k[:, 0], v[:, 0], w[:, 0], position, tables)
    return slot_attention(q[:, 0].to(v.dtype), K, V, W, opts, k_gain, v_gain)


def layer_state(batch: int, kv_heads: int, cache_size: int, head_dim: int, device, dtype, gen):
    """A filled state (every slot non-EMPTY) in logical order, and the identity ring."""
    K = torch.randn(batch, kv_heads, cache_size, head_dim, device=device, generator=gen).to(dtype)
    V = torch.randn(batch, kv_heads, cache_size, head_dim, device=device, generator=gen).to(dtype)
    W = torch.randn(batch, kv_heads, cache_size, device=device, generator=gen)
    return K, V, W, torch.arange(cache_size, device=device)


def main() -> int:
    from avengers.models.registry import get_model_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="tele_ring_step")
    p.add_argument("--variant", default="tele128_llama3_1.8b")
    p.add_argument("--batches", default="1,64,4096")
    p.add_argument("--layers", type=int, default=None, help="distinct layer states per graph (default: the model's)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    spec = get_model_spec(args.variant)
    cfg = spec.config
    opts = cfg.tele_options()
    H, Hkv, d, C = cfg.nheads, cfg.kvheads or cfg.nheads, cfg.emb_dim // cfg.nheads, opts.cache_size
    layers = args.layers or cfg.nlayers
    device, dtype = torch.device("cuda"), torch.bfloat16
    steps, ring_tables = step_tables(C, opts.fmap, device), RingTables(C, opts.fmap, device)
    plain, ring = torch.compile(step_core, fullgraph=True), torch.compile(ring_step_core, fullgraph=True)
    gains = (torch.ones(d, device=device), torch.ones(d, device=device)) if opts.kv_norm else (None, None)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        gen = torch.Generator(device=device).manual_seed(0)
        states = [layer_state(batch, Hkv, C, d, device, dtype, gen) for _ in range(layers)]
        rings = [tuple(x.clone() for x in s) for s in states]
        q = torch.randn(batch, 1, H, d, device=device, generator=gen, dtype=dtype)
        k, v = (torch.randn(batch, 1, Hkv, d, device=device, generator=gen, dtype=dtype) for _ in range(2))
        w = None if opts.gate == "wisq" else torch.randn(batch, 1, Hkv, device=device, generator=gen)
        positions = [torch.tensor(4096 + i, device=device) for i in range(layers)]  # merges of every level, a drop

        def run_plain(i):
            K, V, W, _ = states[i]
            return plain(q, k, v, w, positions[i], K, V, W, steps, opts, cfg.rope_theta, *gains)

        def run_ring(i):
            K, V, W, r = rings[i]
            return ring(q, k, v, w, positions[i], K, V, W, r, ring_tables, opts, cfg.rope_theta, *gains)

        err = (run_ring(0).float() - run_plain(0).float()).abs().max().item()
        state_bytes = sum(x.numel() * x.element_size() for x in states[0][:3])
        row = dict(batch=batch, plain_us=graph_us(run_plain, layers), ring_us=graph_us(run_ring, layers))
        row.update(state_mib=state_bytes / 2**20, max_abs_diff=err)
        rows.append(row)
        print(
            f"batch {batch:5d}: step core {row['plain_us']:9.1f} us/layer, ring map {row['ring_us']:9.1f} "
            f"({row['plain_us'] / row['ring_us']:.2f}x); state {row['state_mib']:.1f} MiB/layer; "
            f"first-step outputs differ by {err:.1e}",
            flush=True,
        )
    write_results(args.out, args.variant, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
