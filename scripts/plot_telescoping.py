"""Draw the telescoping attention pattern from the schedule our code builds.

    python scripts/plot_telescoping.py                      # docs/img/telescoping_c8.png (C=8, 40 steps)
    python scripts/plot_telescoping.py --cache-size 64 --steps 800 --out /tmp/c64.png

Row t is query step t, column s is token s. A coloured cell means token s is inside one of the
C slots query t attends to; the colour is the size of that slot's block (1, 2, 4, ... tokens) and
thin white lines separate neighbouring slots. Empty cells right of the diagonal are the future,
empty cells left of the coloured band are evicted tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avengers.models.telescoping import build_schedule, resolve_fmap, window  # noqa: E402


def pattern(steps: int, cache_size: int, fmap) -> tuple[np.ndarray, np.ndarray]:
    """size[t, s]: block size covering token s at step t (0 = not attended); slot[t, s]: its slot."""
    sched = build_schedule(steps, cache_size, fmap)
    size = np.zeros((steps, steps), dtype=np.int64)
    slot = np.full((steps, steps), -1, dtype=np.int64)
    for t in range(steps):
        for c, j in enumerate(sched.table[t]):
            if j:
                a, b = sched.first[j], sched.last[j] + 1
                size[t, a:b] = b - a
                slot[t, a:b] = c
    return size, slot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-size", type=int, default=8)
    ap.add_argument("--fmap", default=None, help="preset name (default: the preset for the cache size)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/img/telescoping_c8.png"))
    args = ap.parse_args()
    fmap = resolve_fmap(args.fmap, args.cache_size)
    size, slot = pattern(args.steps, args.cache_size, fmap)
    levels = int(np.log2(size.max())) + 1
    colors = ["white"] + [plt.cm.viridis(x) for x in np.linspace(0.9, 0.1, levels)]
    cmap = ListedColormap(colors)
    bounds = [-0.5, 0.5] + [2**i + 0.5 for i in range(levels)]
    norm = BoundaryNorm(bounds, cmap.N)

    cell = 0.22 if args.steps <= 64 else 8.0 / args.steps
    fig, ax = plt.subplots(figsize=(max(6.0, args.steps * cell + 2), max(5.0, args.steps * cell + 1)))
    im = ax.imshow(size, cmap=cmap, norm=norm, interpolation="nearest")
    if args.steps <= 64:  # slot boundaries
        for t in range(args.steps):
            for s in range(1, args.steps):
                if slot[t, s] >= 0 and slot[t, s - 1] >= 0 and slot[t, s] != slot[t, s - 1]:
                    ax.plot([s - 0.5, s - 0.5], [t - 0.5, t + 0.5], color="white", lw=1.2)
        ax.set_xticks(range(0, args.steps, 4))
        ax.set_yticks(range(0, args.steps, 4))
    ax.set_xlabel("key token s")
    ax.set_ylabel("query step t")
    ax.set_title(f"Telescoping cache C={args.cache_size}, fmap {fmap}: window {window(args.cache_size, fmap)} tokens")
    cbar = fig.colorbar(im, ax=ax, ticks=[2**i for i in range(levels)], fraction=0.04)
    cbar.set_label("tokens averaged in the slot")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
