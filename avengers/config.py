"""The training config: fms-fsdp's flag names and meanings, YAML files, flag parsing and validation.

    python -m avengers.train --config configs/demo.yaml --batch_size=4 --selective_checkpointing=1/3

Precedence: dataclass defaults < `--config` YAML < command-line flags. The literal string `None`
means "unset" everywhere. Defaults differ from fms-fsdp only where the original is broken or
site-specific; each such field says so in its comment (docs/training.md lists them).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Union

SHARDING_STRATEGIES = ("fsdp", "hsdp", "ddp")
TRAINING_STAGES = ("initial", "cosine", "annealing", "constant")
TRACKERS = ("wandb", "aim", "tensorboard")
FILE_TYPES = ("arrow", "hf_parquet", "auto")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # --- model and checkpoints (fms-fsdp) ---
    model_variant: str = "llama3_1.8b_4k"  # fms-fsdp: "7b", which is not a registered variant
    ckpt_load_path: str | None = None  # fms-fsdp: /fsx/output/ckpt; file = model only, dir = model + optimizer
    ckpt_save_path: str = "runs/default"  # the run folder; fms-fsdp: /fsx/output/ckpt
    # --- data (fms-fsdp) ---
    use_dummy_dataset: bool = False
    data_path: str = "data"  # fms-fsdp: /fsx/data
    file_type: str = "auto"  # fms-fsdp: "arrow", whose code path crashes on fms-fsdp main
    col_name: str = "tokens"
    tokenizer_path: str | None = None  # fms-fsdp: /fsx/tokenizer
    datasets: str | None = None  # CSV of sub-folders; None = every sub-folder (fms-fsdp: 13 site paths)
    weights: str | None = None  # CSV, one per dataset; None = equal (fms-fsdp: 13 site weights)
    seq_length: int = 4096
    vocab_size: int | None = None  # dummy data only; None = the model's vocabulary (fms-fsdp: 32000)
    bos_token: int | None = None
    eos_token: int = 0
    bol_token: int | None = None
    eol_token: int | None = None
    strip_tokens: str = ""
    logical_shards: int = 1024
    num_workers: int = 1
    # --- parallelism (fms-fsdp) ---
    sharding_strategy: str = "hsdp"
    fsdp_activation_checkpointing: bool = False
    selective_checkpointing: float | str = 1  # a fraction of blocks, e.g. 1/3 (parsed, never eval'd)
    mixed_precision: bool = True  # GPU only: bf16 params/compute, fp32 master weights and reductions
    low_cpu_fsdp: bool = False  # build on the meta device, materialise shards, then init_weights
    # --- training (fms-fsdp) ---
    batch_size: int = 2  # per GPU and micro-batch
    num_steps: int = 1_000_000  # optimizer steps
    training_stage: str = "initial"
    learning_rate: float = 3e-4
    grad_clip_thresh: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    seed: int = 2023
    resuming_dataset: bool = False
    # --- profiling and logging (fms-fsdp) ---
    use_profiler: bool = False
    profiler_rank0_only: bool = True
    report_interval: int = 100
    checkpoint_interval: int = 10_000
    tracker: str | None = None
    tracker_dir: str | None = None  # None = <ckpt_save_path>/tracker (fms-fsdp: /fsx/aim_logs/llama)
    tracker_project_name: str = "llama"
    tracker_run_id: str | None = None
    use_torch_compile: bool = True
    # --- additions of this project ---
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    float8: bool = False  # the blocks' linear layers in fp8 (torchao Float8Linear; Llama, telescoping; sm_89+)
    warmup_steps: int | None = None  # None = fms-fsdp's min(2000, num_steps / 20)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of learning_rate (fms-fsdp: fixed 0.1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    decay_all_params: bool = False  # True = fms-fsdp's decay on norms, biases and embeddings too
    hsdp_shard_size: int | None = None  # HSDP shard-group size; None = processes per node
    ckpt_keep_last: int = 3  # complete checkpoints kept in ckpt_save_path (0 = keep all)
    save_final_checkpoint: bool = True
    async_checkpoint: bool = False  # periodic saves written by a thread while training goes on (train/checkpoint.py)
    stop_at_step: int | None = None  # end this job after this step with a checkpoint (schedule keeps num_steps)
    signal_check_interval: int = 10  # steps between the ranks' checks for SIGUSR1/SIGTERM (stop with a checkpoint)
    shuffle_buffer: int = 10_000  # lines in each loader's shuffle buffer (fms-fsdp: fixed 10,000)
    min_doc_length: int = 3  # shorter documents are skipped (fms-fsdp: fixed 3)
    device: str = "auto"  # auto = cuda when available, else cpu
    eval_fraction: float = 0.0  # share of each dataset's documents held out from training (doc-id hash)
    eval_interval: int = 0  # optimizer steps between evaluations on the held-out documents; 0 = never
    eval_steps: int = 10  # batches per rank in each evaluation
    compile_cache_size_limit: int = 128
    skip_nonfinite_steps: int = 0  # consecutive NaN/inf steps skipped (no update) before stopping; 0 = stop at once

    @property
    def run_dir(self) -> str:
        return self.ckpt_save_path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            try:
                import yaml
            except ModuleNotFoundError:  # JSON is valid YAML; keeps minimal GPU images working
                json.dump(self.to_dict(), f, indent=1)
            else:
                yaml.safe_dump(self.to_dict(), f, sort_keys=False)


class ConfigError(ValueError):
    """A config value or flag that cannot be accepted; the message names it and what is accepted."""


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, FIELDS, n=3, cutoff=0.5)
    hint = f" Did you mean --{close[0]}?" if close else ""
    return ConfigError(f"unknown config field {name!r}.{hint} See docs/training.md for every field.")


def parse_fraction(value: Any) -> float:
    """'1/3', '0.5', 1 -> float, without eval."""
    if isinstance(value, bool):
        raise ConfigError(f"selective_checkpointing={value!r}: expected a fraction such as 1, 0.5 or 1/3")
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"selective_checkpointing={value!r}: expected a fraction such as 1, 0.5 or 1/3") from None


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type; 'None' means unset."""
    tp = _TYPES[name]
    args = typing.get_args(tp)
    is_union = typing.get_origin(tp) in (Union, types.UnionType)
    optional = is_union and type(None) in args
    if value is None or (isinstance(value, str) and value.strip() == "None"):
        if optional:
            return None
        raise ConfigError(f"{name}=None is not allowed: {name} needs a value (default {FIELDS[name].default!r})")
    if name == "selective_checkpointing":
        parse_fraction(value)
        return value if isinstance(value, (int, float)) else str(value).strip()
    base = next(a for a in args if a is not type(None)) if is_union else tp
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "y", "on"):
            return True
        if text in ("false", "0", "no", "n", "off"):
            return False
        raise ConfigError(f"{name}={value!r}: expected a boolean (True/False)")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:
            as_float = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return int(as_float)
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected a number") from None
    if isinstance(value, (list, tuple)):  # YAML lists for CSV fields (datasets, weights, strip_tokens)
        return ",".join(str(v) for v in value)
    return str(value)


def parse_args(argv: list[str]) -> tuple[str | None, dict[str, str | bool]]:
    """`--key=value`, `--key value` and bare `--flag` (= True); returns (config file, overrides)."""
    overrides: dict[str, str | bool] = {}
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --name=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if "." in key:  # fms-fsdp accepted Class.field
            key = key.rsplit(".", 1)[1]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif key == "config" or _TYPES.get(key) is bool:
                value = True
            else:
                raise ConfigError(f"flag --{key} needs a value (--{key}=VALUE)")
        if key == "config":
            config_file = str(value)
        elif key not in FIELDS:
            raise _unknown(key)
        else:
            overrides[key] = value
        i += 1
    return config_file, overrides


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file")
    with open(path) as f:
        try:
            import yaml
        except ModuleNotFoundError:
            data = json.load(f)
        else:
            data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def make_config(config_file: str | None = None, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {}
    if config_file:
        for key, value in load_yaml(config_file).items():
            if key not in FIELDS:
                raise ConfigError(f"in {config_file}: {_unknown(key)}")
            values[key] = value
    values.update(overrides)
    for key in values:
        if key not in FIELDS:
            raise _unknown(key)
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def config_from_argv(argv: list[str]) -> TrainConfig:
    config_file, overrides = parse_args(argv)
    return make_config(config_file, **overrides)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def validate(cfg: TrainConfig, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Every check that needs no model and no data read; raises ConfigError naming the value."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    from avengers.models import get_model_spec

    try:
        spec = get_model_spec(cfg.model_variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(
        cfg.sharding_strategy in SHARDING_STRATEGIES,
        f"sharding_strategy={cfg.sharding_strategy!r}: expected one of {', '.join(SHARDING_STRATEGIES)}",
    )
    need(
        cfg.training_stage in TRAINING_STAGES,
        f"training_stage={cfg.training_stage!r}: expected one of {', '.join(TRAINING_STAGES)}",
    )
    need(
        cfg.tracker is None or cfg.tracker in TRACKERS,
        f"tracker={cfg.tracker!r}: expected None or one of {', '.join(TRACKERS)}",
    )
    need(cfg.file_type in FILE_TYPES, f"file_type={cfg.file_type!r}: expected one of {', '.join(FILE_TYPES)}")
    need(cfg.device in DEVICES, f"device={cfg.device!r}: expected one of {', '.join(DEVICES)}")
    for name in (
        "batch_size",
        "num_steps",
        "seq_length",
        "report_interval",
        "checkpoint_interval",
        "signal_check_interval",
        "grad_accum_steps",
        "logical_shards",
        "compile_cache_size_limit",
        "eval_steps",
    ):
        need(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)}: expected an integer >= 1")
    for name in (
        "num_workers",
        "ckpt_keep_last",
        "shuffle_buffer",
        "min_doc_length",
        "skip_nonfinite_steps",
        "eval_interval",
    ):
        need(getattr(cfg, name) >= 0, f"{name}={getattr(cfg, name)}: expected an integer >= 0")
    need(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate}: expected a positive number")
    need(0 <= cfg.min_lr_ratio <= 1, f"min_lr_ratio={cfg.min_lr_ratio}: expected a number in [0, 1]")
    need(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay}: expected a number >= 0")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(cfg, name) < 1, f"{name}={getattr(cfg, name)}: expected a number in [0, 1)")
    need(cfg.adam_eps > 0, f"adam_eps={cfg.adam_eps}: expected a positive number")
    if cfg.warmup_steps is not None:
        need(
            0 <= cfg.warmup_steps <= cfg.num_steps,
            f"warmup_steps={cfg.warmup_steps}: expected None or an integer in [0, num_steps={cfg.num_steps}]",
        )
    if cfg.stop_at_step is not None:
        need(
            1 <= cfg.stop_at_step <= cfg.num_steps,
            f"stop_at_step={cfg.stop_at_step}: expected None or an integer in [1, num_steps={cfg.num_steps}]",
        )
    parse_fraction(cfg.selective_checkpointing)
    need(
        0 <= cfg.eval_fraction < 1,
        f"eval_fraction={cfg.eval_fraction}: expected a number in [0, 1) (0 = no documents held out)",
    )
    if cfg.eval_interval:
        need(
            not cfg.use_dummy_dataset,
            f"eval_interval={cfg.eval_interval} needs real data (use_dummy_dataset=False): the dummy stream "
            f"has no held-out documents; use eval_interval=0",
        )
        need(
            cfg.eval_fraction > 0,
            f"eval_interval={cfg.eval_interval} needs held-out documents: set eval_fraction to a number in "
            f"(0, 1), e.g. 0.01, or use eval_interval=0",
        )
    if cfg.vocab_size is not None and cfg.use_dummy_dataset:  # real data is checked against the model's vocabulary
        need(
            1 <= cfg.vocab_size <= spec.vocab_size,
            f"vocab_size={cfg.vocab_size} with use_dummy_dataset=True: the dummy token ids must be below "
            f"model_variant {cfg.model_variant!r}'s vocabulary of {spec.vocab_size} "
            f"(use a value in [1, {spec.vocab_size}] or None)",
        )
    if cfg.hsdp_shard_size is not None:
        need(
            cfg.hsdp_shard_size >= 1 and world_size % cfg.hsdp_shard_size == 0,
            f"hsdp_shard_size={cfg.hsdp_shard_size}: expected a divisor of the world size {world_size}",
        )
    elif cfg.sharding_strategy == "hsdp" and local_world_size:
        need(
            world_size % local_world_size == 0,
            f"sharding_strategy=hsdp: world size {world_size} is not a multiple of the processes per node "
            f"{local_world_size}; set hsdp_shard_size to a divisor of {world_size}",
        )
    if not cfg.use_dummy_dataset:
        datasets, weights = _csv(cfg.datasets), _csv(cfg.weights)
        if weights and datasets:
            need(
                len(weights) == len(datasets),
                f"weights={cfg.weights!r} has {len(weights)} values but datasets={cfg.datasets!r} names "
                f"{len(datasets)}: give one weight per dataset (or weights=None for equal weights)",
            )
        for w in weights:
            try:
                ok = float(w) >= 0
            except ValueError:
                ok = False
            need(ok, f"weights={cfg.weights!r}: {w!r} is not a non-negative number")
        if weights:
            need(sum(float(w) for w in weights) > 0, f"weights={cfg.weights!r}: at least one weight must be > 0")
        loaders = world_size * max(cfg.num_workers, 1)
        need(
            cfg.logical_shards % loaders == 0,
            f"logical_shards={cfg.logical_shards} is not divisible by world size x max(num_workers, 1) = "
            f"{world_size} x {max(cfg.num_workers, 1)} = {loaders}; use a multiple of {loaders}",
        )
        for name in ("bos_token", "eos_token", "bol_token", "eol_token"):
            tok = getattr(cfg, name)
            need(
                tok is None or 0 <= tok < spec.vocab_size,
                f"{name}={tok}: expected None or a token id in [0, {spec.vocab_size})",
            )
    need(
        not spec.max_seq_len_is_limit or cfg.seq_length <= spec.max_seq_len,
        f"seq_length={cfg.seq_length}: model_variant {cfg.model_variant!r} cannot take sequences longer than its "
        f"max_seq_len={spec.max_seq_len}; use seq_length <= {spec.max_seq_len} or a variant with a longer context",
    )
