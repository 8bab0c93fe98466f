"""experiments/gpu_tele_ring_step.py: slots kept in place behind a ring map hold, in logical order,
what the decode path's shifting update holds, through merges at every level, EMPTY slots and drops,
and the read-out over them is the same. Pure torch (fp64, CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_tele_ring_step as exp  # noqa: E402

from avengers.decode.telescoping import TelescopingState, push_at, slot_attention, step_tables  # noqa: E402
from avengers.models.telescoping.attention import TeleOptions  # noqa: E402
from avengers.models.telescoping.schedule import FMAP_PRESETS  # noqa: E402


@pytest.mark.parametrize("C,fmap", [(8, (2, 4, 6)), (16, FMAP_PRESETS["c16"]), (10, (1, 9))])
def test_ring_map_slots_equal_the_shifted_slots(C, fmap):
    B, Hkv, H, d, n = 2, 2, 4, 4, 200  # n: several drops past the first eviction
    gen = torch.Generator().manual_seed(5)
    k, v, q = (torch.randn(B, n, h, d, generator=gen, dtype=torch.float64) for h in (Hkv, Hkv, H))
    w = torch.randn(B, n, Hkv, generator=gen, dtype=torch.float64)
    shifted = TelescopingState(B, Hkv, C, d, dtype=torch.float64)
    in_place = TelescopingState(B, Hkv, C, d, dtype=torch.float64)
    ring = torch.arange(C)
    tables, ring_tables = step_tables(C, fmap, torch.device("cpu")), exp.RingTables(C, fmap, torch.device("cpu"))
    opts = TeleOptions(C, fmap, mask_empty=True)
    gain = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    for t in range(n):
        pos = torch.tensor(t)
        push_at(shifted.k, shifted.v, shifted.log_mass, k[:, t], v[:, t], w[:, t], pos, tables)
        exp.ring_push(in_place.k, in_place.v, in_place.log_mass, ring, k[:, t], v[:, t], w[:, t], pos, ring_tables)
        assert sorted(ring.tolist()) == list(range(C))
        for a, b in ((shifted.k, in_place.k), (shifted.v, in_place.v), (shifted.log_mass, in_place.log_mass)):
            torch.testing.assert_close(b.index_select(2, ring), a, atol=1e-12, rtol=0, msg=f"step {t}")
        readouts = [slot_attention(q[:, t], s.k, s.v, s.log_mass, opts, gain, gain) for s in (shifted, in_place)]
        torch.testing.assert_close(readouts[1], readouts[0], atol=1e-12, rtol=0)


def test_ring_step_core_matches_the_step_core():
    C, fmap, B, H, Hkv, d = 8, (2, 4, 6), 3, 4, 2, 8
    gen = torch.Generator().manual_seed(7)
    opts = TeleOptions(C, fmap, softcap=20.0)
    gains = tuple(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    K = torch.randn(B, Hkv, C, d, generator=gen, dtype=torch.float64)
    V, W = torch.randn_like(K), torch.randn(B, Hkv, C, generator=gen, dtype=torch.float64)
    states = [(K.clone(), V.clone(), W.clone()) for _ in range(2)]
    ring = torch.arange(C)
    tables, ring_tables = step_tables(C, fmap, torch.device("cpu")), exp.RingTables(C, fmap, torch.device("cpu"))
    for t in range(100, 140):
        q = torch.randn(B, 1, H, d, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(B, 1, Hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
        w, pos = torch.randn(B, 1, Hkv, generator=gen, dtype=torch.float64), torch.tensor(t)
        want = exp.step_core(q, k, v, w, pos, *states[0], tables, opts, 10000.0, *gains)
        got = exp.ring_step_core(q, k, v, w, pos, *states[1], ring, ring_tables, opts, 10000.0, *gains)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
