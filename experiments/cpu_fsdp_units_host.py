"""Host time of FSDP2 units per block on a world of one rank, where there is nothing to communicate.

    python experiments/cpu_fsdp_units_host.py --out DIR [--layers 48] [--rounds 3] [--steps 20]

A Mamba-2 of mamba2_1.3b's depth (48 blocks) but tiny width, trained on CPU through the trainer's
`parallelize` (bf16 mixed precision, fp32 master weights, AdamW) with its reference kernels: at this
width the kernels cost next to nothing, so a step's time is the host's. Two wrappings, alternating
in one process after a warm-up round: one FSDP2 unit per block (what one rank got before
`unit_per_block`) and the root alone (what it gets now). The difference per block is what the
per-block hooks, casts and copies cost the host, the cost that sets a GPU step whose kernels are
issued slower than they run (docs/mamba.md, "Training speed"). Writes DIR/fsdp_units_host.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.models.mamba.config import MambaConfig  # noqa: E402
from avengers.models.mamba.model import MambaBlock, MambaLM  # noqa: E402
from avengers.train import parallel  # noqa: E402


def step_times(per_block: bool, layers: int, steps: int) -> list[float]:
    """Seconds per training step, steps after two warm-up steps."""
    cfg = MambaConfig(
        d_model=64, n_layer=layers, vocab_size=256, d_state=16, headdim=16, chunk_size=16, kernels="reference"
    )
    torch.manual_seed(0)
    model = MambaLM(cfg)
    model.init_weights()
    kept = parallel.unit_per_block
    parallel.unit_per_block = (lambda mesh: True) if per_block else kept
    try:
        parallel.parallelize(model, (MambaBlock,), init_device_mesh("cpu", (1,)), mixed_precision=True)
    finally:
        parallel.unit_per_block = kept
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 33))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        medians = {"per_block": [], "root": []}
        for name in medians:  # an unrecorded round: a process's first steps run slower
            step_times(name == "per_block", args.layers, 3)
        for r in range(args.rounds):
            for name in medians:
                ms = statistics.median(step_times(name == "per_block", args.layers, args.steps)) * 1e3
                medians[name].append(round(ms, 2))
                print(f"round {r + 1}: {name:9s} {ms:7.1f} ms a step", flush=True)
    finally:
        dist.destroy_process_group()
    per_block, root = statistics.median(medians["per_block"]), statistics.median(medians["root"])
    saved = (per_block - root) / args.layers
    print(f"median: per block {per_block:.1f} ms, root only {root:.1f} ms: {saved:.2f} ms of host time per block")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_units_host.json").write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "host": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread",
                "torch": torch.__version__,
                "command": " ".join(sys.argv),
                "layers": args.layers,
                "step_ms_medians_per_round": medians,
                "host_ms_saved_per_block": round(saved, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
