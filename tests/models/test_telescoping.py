"""Telescoping cache: schedule, node values, parallel == recurrent, flex == gather, gradients.

Spec: shared/specs/telescoping-cache.md §5 (worked table) and §6 items 1-3 and 5.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from avengers.decode.telescoping import (
    TelescopingState,
    advance_ring,
    push_at,
    ring_push,
    slot_attention,
    step_core,
    step_tables,
)
from avengers.models.telescoping import (
    FMAP_PRESETS,
    TeleOptions,
    build_schedule,
    get_plan,
    merge_slot,
    node_values,
    resolve_fmap,
    telescoping_parallel,
    window,
)
from avengers.ops.telescoping import EMPTY_LOG_MASS, rope

C8 = (2, 4, 6)

# spec §5: t, level, merge slot, slot0..slot7 (newest first), covered range
C8_TABLE = """
0 - - 0 - - - - - - - 0-0
1 1 2 1 0 - - - - - - 0-1
2 2 4 2 1 0 - - - - - 0-2
3 1 2 3 2 0-1 - - - - - 0-3
4 3 6 4 3 2 0-1 - - - - 0-4
5 1 2 5 4 2-3 0-1 - - - - 0-5
6 2 4 6 5 4 2-3 0-1 - - - 0-6
7 1 2 7 6 4-5 2-3 0-1 - - - 0-7
8 4 drop 8 7 6 4-5 2-3 0-1 - - 0-8
9 1 2 9 8 6-7 4-5 2-3 0-1 - - 0-9
10 2 4 10 9 8 6-7 2-5 0-1 - - 0-10
11 1 2 11 10 8-9 6-7 2-5 0-1 - - 0-11
12 3 6 12 11 10 8-9 6-7 2-5 0-1 - 0-12
13 1 2 13 12 10-11 8-9 6-7 2-5 0-1 - 0-13
14 2 4 14 13 12 10-11 6-9 2-5 0-1 - 0-14
15 1 2 15 14 12-13 10-11 6-9 2-5 0-1 - 0-15
16 5 drop 16 15 14 12-13 10-11 6-9 2-5 0-1 0-16
17 1 2 17 16 14-15 12-13 10-11 6-9 2-5 0-1 0-17
18 2 4 18 17 16 14-15 10-13 6-9 2-5 0-1 0-18
19 1 2 19 18 16-17 14-15 10-13 6-9 2-5 0-1 0-19
20 3 6 20 19 18 16-17 14-15 10-13 2-9 0-1 0-20
21 1 2 21 20 18-19 16-17 14-15 10-13 2-9 0-1 0-21
22 2 4 22 21 20 18-19 14-17 10-13 2-9 0-1 0-22
23 1 2 23 22 20-21 18-19 14-17 10-13 2-9 0-1 0-23
24 4 drop 24 23 22 20-21 18-19 14-17 10-13 2-9 2-24
25 1 2 25 24 22-23 20-21 18-19 14-17 10-13 2-9 2-25
26 2 4 26 25 24 22-23 18-21 14-17 10-13 2-9 2-26
27 1 2 27 26 24-25 22-23 18-21 14-17 10-13 2-9 2-27
28 3 6 28 27 26 24-25 22-23 18-21 10-17 2-9 2-28
29 1 2 29 28 26-27 24-25 22-23 18-21 10-17 2-9 2-29
30 2 4 30 29 28 26-27 22-25 18-21 10-17 2-9 2-30
31 1 2 31 30 28-29 26-27 22-25 18-21 10-17 2-9 2-31
32 6 drop 32 31 30 28-29 26-27 22-25 18-21 10-17 10-32
33 1 2 33 32 30-31 28-29 26-27 22-25 18-21 10-17 10-33
34 2 4 34 33 32 30-31 26-29 22-25 18-21 10-17 10-34
35 1 2 35 34 32-33 30-31 26-29 22-25 18-21 10-17 10-35
36 3 6 36 35 34 32-33 30-31 26-29 18-25 10-17 10-36
37 1 2 37 36 34-35 32-33 30-31 26-29 18-25 10-17 10-37
38 2 4 38 37 36 34-35 30-33 26-29 18-25 10-17 10-38
39 1 2 39 38 36-37 34-35 30-33 26-29 18-25 10-17 10-39
40 4 drop 40 39 38 36-37 34-35 30-33 26-29 18-25 18-40
"""


def _ranges(sched, t):
    """[(first, last) or None] per slot at step t."""
    return [None if j == 0 else (int(sched.first[j]), int(sched.last[j])) for j in sched.table[t]]


def _fmt(r):
    if r is None:
        return "-"
    return f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"


def test_c8_worked_table_exact():
    sched = build_schedule(41, 8, C8)
    for line in C8_TABLE.strip().splitlines():
        t, lvl, m, *slots, covered = line.split()
        t = int(t)
        assert [_fmt(r) for r in _ranges(sched, t)] == slots, f"t={t}"
        got = merge_slot(t, C8)
        assert ("drop" if got is None else str(got)) == ("drop" if m in ("drop", "-") else m), f"t={t}"
        if t:
            assert str((t & -t).bit_length()) == lvl
        live = [r for r in _ranges(sched, t) if r]
        assert f"{min(r[0] for r in live)}-{max(r[1] for r in live)}" == covered


def _check_invariants(sched, C, fmap):
    prev = None
    for t in range(sched.n):
        ranges = _ranges(sched, t)
        assert ranges[0] == (t, t)
        live = [r for r in ranges if r]
        assert ranges[: len(live)] == live, "EMPTY slots only at the old end"
        for newer, older in zip(live, live[1:]):
            assert older[1] == newer[0] - 1, f"t={t}: ranges not contiguous/ordered {ranges}"
        assert len({r for r in live}) == len(live)
        if prev is not None:  # exactly one merge or one drop, then the insertion at slot 0
            m = merge_slot(t, fmap)
            if m is None:
                assert ranges[1:] == prev[:-1]
            else:
                a, b = prev[m - 1], prev[m]
                merged = a if b is None else (b if a is None else (b[0], a[1]))
                assert ranges[1:] == prev[: m - 1] + [merged] + prev[m + 1 :]
        prev = ranges
    # every node occupies a slot for one unbroken run of steps birth <= t < death
    counts = np.bincount(sched.table.ravel(), minlength=sched.num_nodes)
    steps = np.repeat(np.arange(sched.n), C)
    first_seen = np.full(sched.num_nodes, sched.n)
    last_seen = np.full(sched.num_nodes, -1)
    np.minimum.at(first_seen, sched.table.ravel(), steps)
    np.maximum.at(last_seen, sched.table.ravel(), steps)
    assert np.array_equal(first_seen[1:], sched.birth[1:])
    assert np.array_equal(last_seen[1:] + 1, sched.death[1:])
    assert np.array_equal(counts[1:], (sched.death - sched.birth)[1:])  # one unbroken run each
    # merge passes only read nodes built earlier
    start = sched.n + 1
    for a, b in sched.passes:
        assert a.max() < start and b.max() < start
        start += len(a)
    assert start == sched.num_nodes


@pytest.mark.parametrize("C,fmap,n", [(8, C8, 200), (64, FMAP_PRESETS["c64"], 800), (16, FMAP_PRESETS["c16"], 300)])
def test_schedule_invariants(C, fmap, n):
    _check_invariants(build_schedule(n, C, fmap), C, fmap)


def test_every_fmap_for_c10_is_consistent():
    for L in range(1, 10):
        for fmap in itertools.combinations(range(1, 10), L):
            sched = build_schedule(70, 10, fmap)
            for t in (0, 17, 45, 69):
                live = [r for r in _ranges(sched, t) if r]
                assert live[0] == (t, t)
                assert all(o[1] == nw[0] - 1 for nw, o in zip(live, live[1:]))


@pytest.mark.parametrize("C,first_drop", [(8, 24), (64, 640), (128, 1920)])
def test_window_and_first_eviction(C, first_drop):
    fmap = FMAP_PRESETS[f"c{C}"]
    n = first_drop + 2 * window(C, fmap)
    sched = build_schedule(n, C, fmap)
    covered = np.array([sched.last[row[0]] - sched.first[row[row > 0][-1]] + 1 for row in sched.table])
    evicted = np.nonzero(covered < np.arange(n) + 1)[0]
    assert evicted[0] == first_drop
    assert covered.max() == window(C, fmap)
    assert window(64, FMAP_PRESETS["c64"]) == 685


def test_c64_steady_state_profile():
    fmap = FMAP_PRESETS["c64"]
    sched = build_schedule(3000, 64, fmap)
    expected = [1] * 15 + [2] * 13 + [4] * 11 + [8] * 9 + [16] * 7 + [32] * 5 + [64] * 4
    for t in range(2800, 3000, 7):
        sizes = [r[1] - r[0] + 1 for r in _ranges(sched, t)]
        for c, (got, want) in enumerate(zip(sizes, expected)):
            if c in fmap:  # merge slot m_l alternates between 2^(l-1) and 2^l tokens
                assert got in (want // 2, want), (t, c, got)
            else:
                assert got == want, (t, c, got)
        counts = np.bincount(sizes, minlength=65)
        for size, want in zip((1, 2, 4, 8, 16, 32, 64), (15, 13, 11, 9, 7, 5, 4)):
            assert abs(int(counts[size]) - want) <= 1, (t, size, counts[size])


@pytest.mark.parametrize(
    "bad,match",
    [
        ((2, 2, 6), "strictly increasing"),
        ((0, 4), r"\[1, 7\]"),
        ((2, 8), r"\[1, 7\]"),
        ({1: 2, 3: 6}, "no gaps"),
        ("c9", "unknown fmap preset"),
        ((), "at least one"),
        ((2.0, 4), "ints"),
    ],
)
def test_fmap_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_fmap(bad, 8)


def test_fmap_presets_and_forms():
    for name, slots in FMAP_PRESETS.items():
        C = int(name[1:].split("_")[0])
        assert resolve_fmap(name, C) == slots
    assert resolve_fmap({1: 2, 2: 4, 3: 6}, 8) == C8 == resolve_fmap(None, 8) == resolve_fmap([2, 4, 6], 8)
    assert FMAP_PRESETS["c64"] == (15, 28, 39, 48, 55, 60)
    with pytest.raises(ValueError, match="no preset fmap for cache size C=12"):
        resolve_fmap(None, 12)


def _random_inputs(B, n, H, Hkv, d, dtype, seed=0, theta=1e4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, n, Hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, n, Hkv, d, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(B, n, Hkv, generator=g, dtype=torch.float64)
    pos = torch.arange(n)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    return [x.to(dtype) for x in (q, k, v, w)]


def test_node_values_match_brute_force_fp64():
    B, n, Hkv, d = 2, 60, 2, 4
    _, k, v, w = _random_inputs(B, n, 2, Hkv, d, torch.float64)
    sched = build_schedule(n, 8, C8)
    K, V, W = node_values(k, v, w, get_plan(n, 8, C8, "cpu"))
    for t in range(n):
        for j in sched.table[t]:
            if j == 0:
                assert (
                    K[:, :, j].abs().max() == 0 and V[:, :, j].abs().max() == 0 and (W[:, :, j] == EMPTY_LOG_MASS).all()
                )
                continue
            s = slice(sched.first[j], sched.last[j] + 1)
            p = torch.softmax(w[:, s], dim=1).unsqueeze(-1)
            torch.testing.assert_close(K[:, :, j], (p * k[:, s]).sum(1), atol=1e-12, rtol=0)
            torch.testing.assert_close(V[:, :, j], (p * v[:, s]).sum(1), atol=1e-12, rtol=0)
            torch.testing.assert_close(W[:, :, j], torch.logsumexp(w[:, s], 1), atol=1e-12, rtol=0)


def _recurrent(q, k, v, w, opts, k_gain=None, v_gain=None):
    B, n, _, d = q.shape
    state = TelescopingState(B, k.shape[2], opts.cache_size, d, dtype=q.dtype)
    outs = []
    for t in range(n):
        state.push(k[:, t], v[:, t], w[:, t], merge_slot(t, opts.fmap))
        outs.append(slot_attention(q[:, t], state.k, state.v, state.log_mass, opts, k_gain, v_gain))
    return torch.stack(outs, 1), state


def _gains(d, dtype, kv_norm):
    if not kv_norm:
        return None, None
    g = torch.Generator().manual_seed(1)
    return 1 + 0.3 * torch.randn(d, generator=g, dtype=dtype), 1 + 0.3 * torch.randn(d, generator=g, dtype=dtype)


@pytest.mark.parametrize("mask_empty", [False, True])
@pytest.mark.parametrize("kv_norm", [False, True])
def test_parallel_equals_recurrent_fp64_c8(mask_empty, kv_norm):
    n, d = 155, 8
    q, k, v, w = _random_inputs(2, n, 4, 2, d, torch.float64)
    opts = TeleOptions(8, C8, mask_empty=mask_empty, kv_norm=kv_norm)
    gains = _gains(d, torch.float64, kv_norm)
    plan = get_plan(n, 8, C8, "cpu")
    par, nodes = telescoping_parallel(q, k, v, w, plan, opts, *gains)
    rec, state = _recurrent(q, k, v, w, opts, *gains)
    torch.testing.assert_close(par, rec, atol=1e-10, rtol=0)
    # the recurrent state after the last step is the last table row of the parallel nodes
    ids = plan.table[-1]
    torch.testing.assert_close(state.k, nodes[0][:, :, ids], atol=1e-12, rtol=0)
    torch.testing.assert_close(state.v, nodes[1][:, :, ids], atol=1e-12, rtol=0)
    live = nodes[2][:, :, ids] > -100
    torch.testing.assert_close(state.log_mass[live], nodes[2][:, :, ids][live], atol=1e-12, rtol=0)


def test_parallel_equals_recurrent_softcap_fp64():
    n, d = 60, 8
    q, k, v, w = _random_inputs(1, n, 4, 2, d, torch.float64, seed=3)
    q = q * 8  # large logits so the cap matters
    opts = TeleOptions(8, C8, mask_empty=True, softcap=20.0)
    par, _ = telescoping_parallel(q, k, v, w, get_plan(n, 8, C8, "cpu"), opts)
    rec, _ = _recurrent(q, k, v, w, opts)
    torch.testing.assert_close(par, rec, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mask_empty", [False, True])
def test_parallel_equals_recurrent_fp32_c64(mask_empty):
    n, d = 700, 64
    fmap = FMAP_PRESETS["c64"]
    q64, k64, v64, w64 = _random_inputs(1, n, 4, 2, d, torch.float64, seed=5)
    opts = TeleOptions(64, fmap, mask_empty=mask_empty)
    gains = _gains(d, torch.float64, True)
    plan = get_plan(n, 64, fmap, "cpu")
    ref, _ = telescoping_parallel(q64, k64, v64, w64, plan, opts, *gains)
    q, k, v, w = (x.float() for x in (q64, k64, v64, w64))
    g32 = [g.float() for g in gains]
    par, _ = telescoping_parallel(q, k, v, w, plan, opts, *g32)
    rec, _ = _recurrent(q, k, v, w, opts, *g32)
    for got in (par, rec):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(par, rec, atol=1e-5, rtol=1e-4)


def test_parallel_equals_recurrent_c128_beyond_eviction():
    n, d = 2100, 16
    fmap = FMAP_PRESETS["c128"]
    q, k, v, w = _random_inputs(1, n, 4, 2, d, torch.float64, seed=7)
    opts = TeleOptions(128, fmap)
    gains = _gains(d, torch.float64, True)
    par, _ = telescoping_parallel(q, k, v, w, get_plan(n, 128, fmap, "cpu"), opts, *gains)
    rec, _ = _recurrent(q, k, v, w, opts, *gains)
    torch.testing.assert_close(par, rec, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "mask_empty,softcap,block_q",
    [(False, None, None), (True, None, None), (False, 20.0, None), (False, None, 128), (True, None, 128)],
)
def test_flex_equals_gather(mask_empty, softcap, block_q):
    # CPU: eager flex_attention (forward only; torch has no flex backward on CPU). block_q=128 with
    # n=300: three column runs, the last one for a partial query block
    n, d = (70 if block_q is None else 300), 8
    q, k, v, w = _random_inputs(2, n, 4, 2, d, torch.float64, seed=11)
    q = q * 4
    opts = TeleOptions(8, C8, mask_empty=mask_empty, softcap=softcap)
    gains = _gains(d, torch.float64, True)
    ref, _ = telescoping_parallel(q, k, v, w, get_plan(n, 8, C8, "cpu"), opts, *gains, impl="gather")
    plan = get_plan(n, 8, C8, "cpu", flex=True, flex_block_q=block_q)
    assert plan.block_mask is not None and (plan.layout.ids is None) == (block_q is None)
    out, _ = telescoping_parallel(q, k, v, w, plan, opts, *gains, impl="flex")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention needs CUDA")
@pytest.mark.parametrize("mask_empty", [False, True])
def test_flex_equals_gather_cuda_with_grads(mask_empty):
    n, d, C = 600, 64, 64
    fmap = FMAP_PRESETS["c64"]
    q, k, v, w = (x.cuda() for x in _random_inputs(2, n, 4, 2, d, torch.float32, seed=17))
    opts = TeleOptions(C, fmap, mask_empty=mask_empty)
    gains = [g.cuda() for g in _gains(d, torch.float32, True)]
    ref_in = [x.clone().requires_grad_() for x in (q, k, v, w)]
    flex_in = [x.clone().requires_grad_() for x in (q, k, v, w)]
    ref, _ = telescoping_parallel(*ref_in, get_plan(n, C, fmap, "cuda"), opts, *gains, impl="gather")
    plan = get_plan(n, C, fmap, "cuda", flex=True)
    out, _ = telescoping_parallel(*flex_in, plan, opts, *gains, impl="flex")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(ref)
    (ref * grad).sum().backward()
    (out * grad).sum().backward()
    for a, b in zip(ref_in, flex_in):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3)


def test_gradcheck_fp64():
    n, d = 40, 4
    q, k, v, w = _random_inputs(1, n, 2, 1, d, torch.float64, seed=13)
    opts = TeleOptions(8, C8)
    plan = get_plan(n, 8, C8, "cpu")
    gk, gv = _gains(d, torch.float64, True)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, w, gk, gv)]

    def f(q, k, v, w, gk, gv):
        return telescoping_parallel(q, k, v, w, plan, opts, gk, gv)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_merge_is_pairwise_not_prefix_differences():
    # a wide gate range: prefix sums of e^w*x would lose the small block entirely
    n = 20
    k = torch.zeros(1, n, 1, 1, dtype=torch.float32)
    k[0, :10] = 1.0
    v = k.clone()
    w = torch.zeros(1, n, 1)
    w[0, :10] = 80.0  # old tokens dominate any running sum by e^80
    K, _, _ = node_values(k, v, w, get_plan(n, 8, C8, "cpu"))
    sched = build_schedule(n, 8, C8)
    for j in sched.table[-1]:
        if j and sched.first[j] >= 10:
            assert K[0, :, j].abs().max() == 0  # exact means of the zero tokens
    assert not math.isnan(K.sum().item())


def test_chunked_gather_equals_single_pass():
    from avengers.models.telescoping import gather_attention

    n, d = 90, 8
    q, k, v, w = _random_inputs(2, n, 4, 2, d, torch.float64, seed=19)
    plan = get_plan(n, 8, C8, "cpu")
    opts = TeleOptions(8, C8, mask_empty=True)
    K, V, _ = node_values(k, v, w, plan)
    whole = gather_attention(q, K, V, plan, opts)
    with torch.no_grad():
        chunked = gather_attention(q, K, V, plan, opts, chunk_elems=7 * 2 * 8 * 2 * d)  # 7 queries a chunk
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


@pytest.mark.parametrize("C,fmap", [(8, C8), (16, FMAP_PRESETS["c16"]), (10, (1, 9))])
def test_table_driven_step_equals_reference_push(C, fmap):
    n, d = 300, 4
    _, k, v, w = _random_inputs(2, n, 2, 2, d, torch.float64, seed=23)
    ref = TelescopingState(2, 2, C, d, dtype=torch.float64)
    fast = TelescopingState(2, 2, C, d, dtype=torch.float64)
    tables = step_tables(C, fmap, torch.device("cpu"))
    for t in range(n):
        ref.push(k[:, t], v[:, t], w[:, t], merge_slot(t, fmap))
        push_at(fast.k, fast.v, fast.log_mass, k[:, t], v[:, t], w[:, t], torch.tensor(t), tables)
        for a, b in ((ref.k, fast.k), (ref.v, fast.v), (ref.log_mass, fast.log_mass)):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0)  # SIMD vs scalar exp: ulps differ


@pytest.mark.parametrize("C,fmap", [(8, C8), (16, FMAP_PRESETS["c16"]), (10, (1, 9))])
def test_ring_map_slots_equal_the_shifted_slots(C, fmap):
    """Slots kept in place behind the ring map hold, in logical order, what the shifting update
    holds, through merges at every level, EMPTY slots and drops; the read-out over them is the same."""
    B, Hkv, H, d, n = 2, 2, 4, 4, 200  # n: several drops past the first eviction
    q, k, v, w = _random_inputs(B, n, H, Hkv, d, torch.float64, seed=5)
    shifted = TelescopingState(B, Hkv, C, d, dtype=torch.float64)
    in_place = TelescopingState(B, Hkv, C, d, dtype=torch.float64)
    tables = step_tables(C, fmap, torch.device("cpu"))
    opts = TeleOptions(C, fmap, mask_empty=True)
    gain = torch.rand(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    for t in range(n):
        pos = torch.tensor(t)
        push_at(shifted.k, shifted.v, shifted.log_mass, k[:, t], v[:, t], w[:, t], pos, tables)
        ring_push(in_place.k, in_place.v, in_place.log_mass, in_place.ring, k[:, t], v[:, t], w[:, t], pos, tables)
        advance_ring(in_place.ring, pos, tables)  # what the cache does once every layer took the step
        assert sorted(in_place.ring.tolist()) == list(range(C))
        for a, b in ((shifted.k, in_place.k), (shifted.v, in_place.v), (shifted.log_mass, in_place.log_mass)):
            torch.testing.assert_close(b.index_select(2, in_place.ring), a, atol=1e-12, rtol=0, msg=f"step {t}")
        readouts = [slot_attention(q[:, t], s.k, s.v, s.log_mass, opts, gain, gain) for s in (shifted, in_place)]
        torch.testing.assert_close(readouts[1], readouts[0], atol=1e-12, rtol=0)
        if t == 0:  # the drop step rotated the whole ring: the eager reference wants logical order
            with pytest.raises(ValueError, match="ring map"):
                in_place.push(k[:, t], v[:, t], w[:, t], None)


def test_step_core_with_a_ring_map_matches_the_shifting_one():
    C, fmap, B, H, Hkv, d = 8, C8, 3, 4, 2, 8
    gen = torch.Generator().manual_seed(7)
    opts = TeleOptions(C, fmap, softcap=20.0)
    gains = tuple(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    K = torch.randn(B, Hkv, C, d, generator=gen, dtype=torch.float64)
    V, W = torch.randn_like(K), torch.randn(B, Hkv, C, generator=gen, dtype=torch.float64)
    states = [(K.clone(), V.clone(), W.clone()) for _ in range(2)]
    ring, tables = torch.arange(C), step_tables(C, fmap, torch.device("cpu"))
    for t in range(100, 140):
        q = torch.randn(B, 1, H, d, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, 1, Hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
        w, pos = torch.randn(B, 1, Hkv, generator=gen, dtype=torch.float64), torch.tensor(t)
        want = step_core(q, k, v, w, pos, *states[0], None, tables, opts, 10000.0, *gains)
        got = step_core(q, k, v, w, pos, *states[1], ring, tables, opts, 10000.0, *gains)
        advance_ring(ring, pos, tables)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("P", [50, 77])  # n/3 (not a power of two) and just past the first eviction
def test_prefill_state_then_recurrent_equals_parallel_fp64(P):
    n, d = 150, 8
    q, k, v, w = _random_inputs(2, n, 4, 2, d, torch.float64, seed=29)
    opts = TeleOptions(8, C8)
    gains = _gains(d, torch.float64, True)
    full, _ = telescoping_parallel(q, k, v, w, get_plan(n, 8, C8, "cpu"), opts, *gains)
    plan = get_plan(P, 8, C8, "cpu")
    head, nodes = telescoping_parallel(q[:, :P], k[:, :P], v[:, :P], w[:, :P], plan, opts, *gains)
    state = TelescopingState(2, 2, 8, d, dtype=torch.float64)
    state.load_nodes(nodes, plan.table[-1])
    tail = []
    for t in range(P, n):
        state.push(k[:, t], v[:, t], w[:, t], merge_slot(t, C8))
        tail.append(slot_attention(q[:, t], state.k, state.v, state.log_mass, opts, *gains))
    torch.testing.assert_close(torch.cat([head, torch.stack(tail, 1)], 1), full, atol=1e-10, rtol=0)
