"""The telescoping merge schedule: which token range each of the C slots holds after every step.

Each layer keeps C slots per KV head; slot c holds the exp(w)-weighted mean of the (RoPE'd) keys
and of the values of one contiguous token range, and older slots cover exponentially longer
ranges. The slot contents at step t depend only on t, C and the fmap (level -> merge slot), so
the schedule is simulated once on CPU per (n, C, fmap) into a node array (EMPTY, the n tokens,
then every merged range ordered by depth) plus `table[t, c]`, the node in slot c at t
(docs/telescoping-cache.md has a worked example).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

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

    def __init__(self, sched: Schedule, device: torch.device):
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
        # set by attention.get_plan when the flex path reads this plan (flex.py)
        self.layout = self.block_mask = None
        self.score_mods: dict = {}  # flex score_mods for eager callers
