"""Associative recall vs decode-cache size: train small models of every family on MQAR and score them.

    python -m avengers.recall --preset smoke --out runs/recall_smoke      # seconds, CPU
    python -m avengers.recall --preset cpu --out runs/recall_cpu          # ~20 minutes on 2 busy CPU cores
    python -m avengers.recall --preset gpu --out runs/recall_gpu          # one H100: ~14 min of training (resumable)

A sweep names registry base variants and config-field overrides (width, depth, d_state,
tele_cache_size, ...), so a new family is swept by adding one `RecallModel` line. Each (model,
seq_len) pair is trained once, through the trainer's own optimizer, LR schedule, loss and gradient
clipping, on a mix of every kv-pair count that fits that length, then scored per kv-pair count on
fresh sequences. The decode cache is measured, not computed: `model.allocate_cache(1, seq_len,
dtype=bfloat16).nbytes_per_sequence()`.

Results go to <out>/results.jsonl (one line per (model, seq_len, kv_pairs), appended as each run
finishes; a rerun skips what is there), and results.json, results.md and recall.png are rebuilt
from it after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from avengers.models.registry import ModelSpec, get_model_spec
from avengers.quality.mqar import MQARTask, mqar_batch, recall_accuracy

log = logging.getLogger(__name__)

WIDTH_FIELDS = ("d_model", "emb_dim")  # the config field that is a family's model width
CACHE_DTYPE = torch.bfloat16  # cache bytes are reported at the serving dtype
EVAL_SEED_OFFSET = 1_000_003  # evaluation sequences come from their own generator stream


@dataclass(frozen=True)
class RecallModel:
    """One model of a sweep: a registry variant with some config fields changed.

    `family` is the plot line the model belongs to; `label` names the model in tables (default:
    the base variant plus its overrides); `learning_rates`, if given, replace the sweep's for this
    model (a family's known-good LR saves the runs at the others).
    """

    family: str
    base: str
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    learning_rates: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return " ".join([self.base] + [f"{k}={v}" for k, v in self.overrides.items()])


@dataclass(frozen=True)
class RecallSweep:
    """Models x sequence lengths x kv-pair counts, and the training recipe of every run."""

    models: tuple[RecallModel, ...]
    seq_lens: tuple[int, ...]
    kv_pairs: tuple[int, ...]
    vocab_size: int = 8192
    steps: int = 1000
    batch_size: int = 64
    learning_rates: tuple[float, ...] = (1e-3,)  # each model is trained at each; the best accuracy is reported
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_examples: int = 256  # fresh sequences scored per kv-pair count
    power_a: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        if not self.models:
            raise ValueError("a recall sweep needs at least one model")
        for name in ("vocab_size", "steps", "batch_size", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: expected an integer in [0, steps={self.steps}]")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates={self.learning_rates}: expected one or more positive numbers")
        for model in self.models:
            if model.learning_rates and min(model.learning_rates) <= 0:
                raise ValueError(
                    f"model {model.name!r}: learning_rates={model.learning_rates}: expected positive numbers"
                )
        for seq_len in self.seq_lens:
            if not self.tasks(seq_len):
                raise ValueError(
                    f"seq_len={seq_len} fits none of kv_pairs={self.kv_pairs} (MQAR needs 4 * kv_pairs <= "
                    f"seq_len); drop it or add kv_pairs <= {seq_len // 4}"
                )
        for model in self.models:
            model_spec(model, self.vocab_size, max(self.seq_lens))  # unknown variants and fields fail here

    def tasks(self, seq_len: int) -> list[MQARTask]:
        return [MQARTask(seq_len, p, self.vocab_size, self.power_a) for p in self.kv_pairs if 4 * p <= seq_len]


# The presets' models: 2 layers, attention heads of width 32 (one head below width 64), Mamba-2
# heads of 16 channels; the width and the state knob (d_state, tele_cache_size) vary.


def _attention(width: int, layers: int = 2) -> RecallModel:
    heads = max(width // 32, 1)
    return RecallModel(
        "attention",
        "llama3_tiny",
        dict(emb_dim=width, nlayers=layers, nheads=heads, kvheads=heads, multiple_of=16),
        f"attention d={width}",
    )


def _mamba2(width: int, d_state: int, layers: int = 2) -> RecallModel:
    return RecallModel(
        "mamba2",
        "mamba2_tiny",
        dict(d_model=width, n_layer=layers, d_state=d_state, headdim=16),
        f"mamba2 d={width} N={d_state}",
    )


def _hybrid(width: int, d_state: int) -> RecallModel:
    """A Mamba-2 layer, then an attention layer (mamba_ssm MHA with half-rotary heads of width 32)."""
    heads = max(width // 32, 1)
    return RecallModel(
        "hybrid",
        "hybrid_tiny",
        dict(
            d_model=width,
            n_layer=2,
            d_state=d_state,
            headdim=16,
            attn_layer_idx=(1,),
            attn_num_heads=heads,
            attn_num_heads_kv=heads,
            attn_head_dim=width // heads,
            attn_rotary_emb_dim=width // heads // 2,
        ),
        f"hybrid d={width} N={d_state}",
    )


def _telescoping(width: int, cache_size: int, layers: int = 2) -> RecallModel:
    heads = max(width // 32, 1)
    return RecallModel(
        "telescoping",
        "tele_tiny",
        dict(
            emb_dim=width,
            nlayers=layers,
            nheads=heads,
            kvheads=heads,
            multiple_of=16,
            tele_cache_size=cache_size,
            tele_fmap=None,
        ),
        f"telescoping d={width} C={cache_size}",
    )


# The LR at which each family learned MQAR in the CPU preset (docs/results.md). Training each GPU-preset
# model at its family's LR alone halves the sweep, so that it fits fewer device calls.
FAMILY_LR = {"attention": 3e-3, "telescoping": 3e-3, "mamba2": 1e-2, "hybrid": 1e-2}


def _at_family_lr(*models: RecallModel) -> tuple[RecallModel, ...]:
    return tuple(dataclasses.replace(m, learning_rates=(FAMILY_LR[m.family],)) for m in models)


def _grid(widths: tuple[int, ...], d_states: tuple[int, ...], cache_sizes: tuple[int, ...]) -> tuple:
    models: list[RecallModel] = []
    for w in widths:
        models.append(_attention(w))
        models += [_mamba2(w, n) for n in d_states]
        models.append(_hybrid(w, d_states[0]))
        models += [_telescoping(w, c) for c in cache_sizes]
    return tuple(models)


PRESETS: dict[str, RecallSweep] = {
    # The test's configuration: every family, one tiny width, seconds on one CPU core.
    "smoke": RecallSweep(
        models=_grid((32,), (8,), (8,)),
        seq_lens=(16,),
        kv_pairs=(2, 4),
        vocab_size=64,
        steps=12,
        batch_size=8,
        learning_rates=(3e-3,),
        warmup_steps=2,
        eval_examples=16,
    ),
    # ~20 minutes on 2 busy CPU cores: attention at two widths, the state knob of each fixed-state family.
    "cpu": RecallSweep(
        models=(
            _attention(32),
            _attention(64),
            *(_mamba2(64, n) for n in (4, 16, 64)),
            _hybrid(64, 16),
            *(_telescoping(64, c) for c in (8, 16)),
        ),
        seq_lens=(32,),
        kv_pairs=(2, 4, 8),
        vocab_size=128,
        steps=1200,
        batch_size=32,
        learning_rates=(3e-3, 1e-2),  # attention learns at the first, Mamba-2 at the second
        warmup_steps=100,
        eval_examples=512,
    ),
    # T=256, Zoology's MQAR grid at one length, every family at its state knob, widths 64..256. Vocabulary 1024,
    # not Zoology's 8192: in 1,500-2,000 steps attention learns MQAR at 1024 and stays at chance at 8192
    # (docs/quality.md). One LR per model (its family's); the first, shared-GPU run took 33-75 s per LR.
    "gpu": RecallSweep(
        # width 128 of every family first, so a sweep cut short by its time budget still compares them all
        models=_at_family_lr(
            _attention(128),
            *(_mamba2(128, n) for n in (16, 64, 256)),
            _hybrid(128, 64),
            *(_telescoping(128, c) for c in (8, 16, 32, 64)),
            *(_attention(w) for w in (64, 256)),
            *(_mamba2(64, n) for n in (16, 64)),
        ),
        seq_lens=(256,),
        kv_pairs=(4, 8, 16, 32, 64),
        vocab_size=1024,
        steps=2000,
        batch_size=64,
        learning_rates=(3e-3, 1e-2),  # for models added without their own (each preset model has its family's)
        warmup_steps=200,
        eval_examples=512,
    ),
    # A second call: the same families at T=1024, where a KV cache is 4x the T=256 one.
    "gpu_long": RecallSweep(
        models=_at_family_lr(
            _attention(128),
            *(_mamba2(128, n) for n in (64, 256)),
            _hybrid(128, 64),
            *(_telescoping(128, c) for c in (32, 64)),
        ),
        seq_lens=(1024,),
        kv_pairs=(16, 32, 64, 128, 256),
        vocab_size=1024,
        steps=2000,
        batch_size=32,
        learning_rates=(3e-3, 1e-2),
        warmup_steps=200,
        eval_examples=256,
    ),
}


def model_spec(model: RecallModel, vocab_size: int, seq_len: int) -> ModelSpec:
    """The base variant with the overrides, the task's vocabulary and room for seq_len positions."""
    base = get_model_spec(model.base)
    changes = dict(model.overrides)
    vocab_field = "src_vocab_size" if hasattr(base.config, "src_vocab_size") else "vocab_size"
    changes[vocab_field] = vocab_size
    if hasattr(base.config, "max_expected_seq_len"):
        changes["max_expected_seq_len"] = max(seq_len, base.max_seq_len)
    try:
        spec = base.replace(**changes)
    except TypeError as e:  # an unknown config field
        fields = (
            sorted(f.name for f in dataclasses.fields(base.config)) if dataclasses.is_dataclass(base.config) else []
        )
        raise ValueError(
            f"model {model.name!r}: {e}; {model.base}'s config fields are: {', '.join(fields) or 'see its config'}"
        ) from None
    return dataclasses.replace(spec, max_seq_len=max(seq_len, base.max_seq_len))


def width_of(config: Any) -> int | None:
    return next((int(getattr(config, f)) for f in WIDTH_FIELDS if hasattr(config, f)), None)


def cache_bytes_per_sequence(model: torch.nn.Module, seq_len: int) -> float:
    """Measured from the allocated decode cache of one sequence of seq_len tokens (bf16 states)."""
    cache = model.allocate_cache(1, seq_len, device="cpu", dtype=CACHE_DTYPE)
    return float(cache.nbytes_per_sequence())


def _batch(tasks: list[MQARTask], batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size rows split as evenly as possible over the tasks (every row has the same length)."""
    sizes = [batch_size // len(tasks) + (i < batch_size % len(tasks)) for i in range(len(tasks))]
    parts = [mqar_batch(t, n, gen) for t, n in zip(tasks, sizes) if n]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_and_score(
    spec: ModelSpec,
    tasks: list[MQARTask],
    sweep: RecallSweep,
    learning_rate: float,
    device: torch.device,
    seed: int,
    compile_blocks: bool = False,
) -> dict[str, Any]:
    """Train one model on the mix of `tasks` and score it on each; returns accuracies and timings."""
    from avengers.config import TrainConfig
    from avengers.train.parallel import parallelize
    from avengers.train.schedule import build_scheduler
    from avengers.train.trainer import build_optimizer, clip_grad_norm

    cfg = TrainConfig(
        learning_rate=learning_rate,
        weight_decay=sweep.weight_decay,
        num_steps=sweep.steps,
        warmup_steps=sweep.warmup_steps,
        training_stage="cosine",
    )
    torch.manual_seed(seed)
    model = spec.build("cpu")
    model.init_weights()
    model.to(device)
    if compile_blocks:
        parallelize(model, spec.block_types, None, compile_blocks=True)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.num_steps, cfg.training_stage, cfg.warmup_steps, cfg.min_lr_ratio)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(seed)  # batches are drawn on the training device
    t0 = time.perf_counter()
    model.train()
    loss_sum = torch.zeros((), device=device)
    tail = max(sweep.steps // 10, 1)
    for step in range(sweep.steps):
        inputs, labels = _batch(tasks, sweep.batch_size, gen)
        with autocast:
            loss = model(inputs, labels=labels)  # the trainer's loss: no [tokens, vocab] logits held
        loss.backward()
        clip_grad_norm(model, cfg.grad_clip_thresh)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= sweep.steps - tail:
            loss_sum += loss.detach()
    train_loss = loss_sum.item() / tail
    train_s = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator(device).manual_seed(seed + EVAL_SEED_OFFSET)
    accuracy = {}
    with torch.no_grad(), autocast:
        for task in tasks:
            correct = scored = 0
            for start in range(0, sweep.eval_examples, sweep.batch_size):
                n = min(sweep.batch_size, sweep.eval_examples - start)
                inputs, labels = mqar_batch(task, n, eval_gen)
                c, s = recall_accuracy(model(inputs), labels)
                correct, scored = correct + c, scored + s
            accuracy[task.kv_pairs] = correct / scored
    return {"accuracy": accuracy, "train_loss": train_loss, "train_s": train_s}


def _key(model: RecallModel, seq_len: int, kv_pairs: int) -> tuple:
    return (model.family, model.name, seq_len, kv_pairs)


def read_rows(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_sweep(
    sweep: RecallSweep,
    out_dir: str,
    device: torch.device | str = "cpu",
    families: tuple[str, ...] = (),
    compile_blocks: bool = False,
    time_budget_s: float | None = None,
) -> list[dict[str, Any]]:
    """Train and score every (model, seq_len) not yet in <out_dir>/results.jsonl; returns all rows.

    With time_budget_s, no new run starts once that many seconds have passed (the same call again
    continues with the runs left)."""
    sweep.validate()
    device = torch.device(device)
    known = {m.family for m in sweep.models}
    unknown = sorted(set(families) - known)
    if unknown:
        raise ValueError(f"families={unknown}: not in this sweep; it has {', '.join(sorted(known))}")
    os.makedirs(out_dir, exist_ok=True)
    rows_path = os.path.join(out_dir, "results.jsonl")
    rows = read_rows(rows_path)
    done = {(r["family"], r["model"], r["seq_len"], r["kv_pairs"]) for r in rows}
    todo = [
        (m, t)
        for t in sweep.seq_lens
        for m in sweep.models
        if (not families or m.family in families) and any(_key(m, t, k.kv_pairs) not in done for k in sweep.tasks(t))
    ]
    log.info("recall sweep: %d runs to do, %d rows already in %s", len(todo), len(rows), rows_path)
    from tqdm import tqdm

    bar = tqdm(todo, desc="recall", unit="run", disable=not sys.stderr.isatty())
    start = time.perf_counter()
    for i, (model, seq_len) in enumerate(bar):
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
            log.warning(
                "time budget of %.0f s spent: %d runs left; run the same command again", time_budget_s, len(todo) - i
            )
            break
        spec = model_spec(model, sweep.vocab_size, seq_len)
        tasks = sweep.tasks(seq_len)
        best: dict[str, Any] | None = None
        run_start = time.perf_counter()
        for lr in model.learning_rates or sweep.learning_rates:
            result = train_and_score(spec, tasks, sweep, lr, device, sweep.seed, compile_blocks)
            result["learning_rate"] = lr
            if best is None or sum(result["accuracy"].values()) > sum(best["accuracy"].values()):
                best = result
        run_s = time.perf_counter() - run_start  # every learning rate: what a time budget has to hold
        built = spec.build("meta")
        cache_bytes = cache_bytes_per_sequence(spec.build("cpu"), seq_len)
        new = [
            {
                "family": model.family,
                "model": model.name,
                "base": model.base,
                "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in model.overrides.items()},
                "width": width_of(spec.config),
                "params": sum(p.numel() for p in built.parameters()),
                "seq_len": seq_len,
                "kv_pairs": task.kv_pairs,
                "vocab_size": sweep.vocab_size,
                "cache_bytes_per_seq": cache_bytes,
                "accuracy": best["accuracy"][task.kv_pairs],
                "learning_rate": best["learning_rate"],
                "train_loss": best["train_loss"],
                "train_s": best["train_s"],
                "run_s": run_s,
                "steps": sweep.steps,
                "device": device.type,
            }
            for task in tasks
            if _key(model, seq_len, task.kv_pairs) not in done
        ]
        with open(rows_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        rows += new
        accs = " ".join(f"P{r['kv_pairs']}={r['accuracy']:.2f}" for r in new)
        message = (
            f"[{i + 1}/{len(todo)}] {model.name} T={seq_len}: {accs} (LR {best['learning_rate']:g}, {run_s:.0f} s)"
        )
        if bar.disable:  # not a TTY: one plain line per run
            log.info(message)
        else:
            bar.write(message)
        write_report(rows, out_dir)
    if not todo:
        write_report(rows, out_dir)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, seq_len): its cache bytes and the accuracy at each kv-pair count."""
    kvs = sorted({r["kv_pairs"] for r in rows})
    groups: dict[tuple, dict[int, float]] = {}
    first: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["seq_len"], r["family"], r["model"])
        groups.setdefault(key, {})[r["kv_pairs"]] = r["accuracy"]
        first.setdefault(key, r)
    head = (
        "| T | family | model | width | params | cache KiB/seq | best LR | " + " | ".join(f"P={k}" for k in kvs) + " |"
    )
    lines = [head, "|" + "---|" * (7 + len(kvs))]
    order = sorted(groups, key=lambda k: (k[0], k[1], first[k]["cache_bytes_per_seq"], k[2]))
    for key in order:
        r = first[key]
        accs = " | ".join(f"{groups[key][k]:.2f}" if k in groups[key] else "" for k in kvs)
        lines.append(
            f"| {r['seq_len']} | {r['family']} | {r['model']} | {r['width']} | {r['params'] / 1e3:.0f}K | "
            f"{r['cache_bytes_per_seq'] / 1024:.1f} | {r['learning_rate']:g} | {accs} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy (mean over kv-pair counts) vs cache KiB per sequence, a line per family, a panel per T;
    each point is labelled with its model's name less the family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    seq_lens = sorted({r["seq_len"] for r in rows})
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5.5 * len(seq_lens) + 1.3, 4.2), squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens):
        for family in families:
            points: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                if r["seq_len"] == seq_len and r["family"] == family:
                    points.setdefault(r["model"], []).append(r)
            if not points:
                continue
            xy = sorted(
                (ps[0]["cache_bytes_per_seq"] / 1024, sum(p["accuracy"] for p in ps) / len(ps), name)
                for name, ps in points.items()
            )
            line = ax.plot([x for x, _, _ in xy], [y for _, y, _ in xy], marker="o", label=family)[0]
            for x, y, name in xy:
                short = name[len(family) :].strip() if name.startswith(family) else name
                ax.annotate(
                    short, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=6, color=line.get_color()
                )
        kvs = sorted({r["kv_pairs"] for r in rows if r["seq_len"] == seq_len})
        ax.set(xscale="log", title=f"T={seq_len}, kv pairs {kvs[0]}..{kvs[-1]}", xlabel="decode cache KiB / sequence")
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.05)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (mean over kv pairs)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(rows))
    if rows:
        plot(rows, os.path.join(out_dir, "recall.png"), title=f"MQAR recall vs cache size ({rows[0]['device']})")


def load_sweep(path: str) -> RecallSweep:
    """A sweep from YAML/JSON: RecallSweep's fields, models as a list of {family, base, overrides, label,
    learning_rates}."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    known = {f.name for f in dataclasses.fields(RecallSweep)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown sweep fields {unknown}; known: {', '.join(sorted(known))}")
    models = tuple(
        RecallModel(**{k: tuple(v) if k == "learning_rates" else v for k, v in m.items()})
        for m in data.pop("models", [])
    )
    tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
    return RecallSweep(models=models, **{**data, **tuples})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avengers.recall", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--sweep", help="a YAML/JSON sweep file instead of a preset (fields of RecallSweep)")
    parser.add_argument("--out", default=None, help="output folder (default runs/recall_<preset>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--families", default="", help="comma-separated subset of the sweep's families")
    parser.add_argument("--steps", type=int, default=None, help="override the sweep's training steps per run")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU)")
    parser.add_argument("--time_budget_s", type=float, default=None, help="start no new run after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join("runs", f"recall_{args.preset if not args.sweep else 'custom'}")
    families = tuple(f for f in args.families.split(",") if f)
    try:
        sweep = load_sweep(args.sweep) if args.sweep else PRESETS[args.preset]
        if args.steps is not None:
            sweep = dataclasses.replace(sweep, steps=args.steps, warmup_steps=min(sweep.warmup_steps, args.steps))
        rows = run_sweep(sweep, out, device, families, args.compile, args.time_budget_s)
    except (ValueError, TypeError, FileNotFoundError) as e:  # TypeError: a sweep file's model with unknown keys
        print(f"avengers.recall: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    run_s = math.fsum({(r["model"], r["seq_len"]): r.get("run_s", r["train_s"]) for r in rows}.values())
    print(f"wrote {out}/results.json, results.md, recall.png ({run_s:.0f} s of runs)")
    return 0
