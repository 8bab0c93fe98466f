import os
import subprocess
import sys

import pytest
import yaml

from avengers.config import ConfigError, TrainConfig, config_from_argv, make_config, parse_args, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_LLAMA_FLAGS = (
    "--model_variant=llama3_1.8b_4k --use_dummy_dataset=False --data_path=/gpfs --datasets=fineweb-edu "
    "--weights=1 --seq_length=4096 --vocab_size=128256 --bos_token=None --eos_token=128000 "
    "--logical_shards=960 --ckpt_load_path=/runs/l --ckpt_save_path=/runs/l "
    "--fsdp_activation_checkpointing=False --selective_checkpointing=1 --sharding_strategy=hsdp "
    "--low_cpu_fsdp=False --batch_size=4 --num_steps=33000 --learning_rate=6e-4 --report_interval=100 "
    "--checkpoint_interval=33000 --use_profiler=False --use_torch_compile=True --tracker=None "
    "--tracker_dir=/aim/aim --tracker_project_name=llama --tracker_run_id=None"
).split()


def test_fms_fsdp_fields_are_all_present():
    fms = """model_variant ckpt_load_path ckpt_save_path use_dummy_dataset data_path file_type col_name
    tokenizer_path datasets weights seq_length vocab_size bos_token eos_token bol_token eol_token strip_tokens
    logical_shards num_workers sharding_strategy fsdp_activation_checkpointing selective_checkpointing
    mixed_precision low_cpu_fsdp batch_size num_steps training_stage learning_rate grad_clip_thresh seed
    resuming_dataset use_profiler profiler_rank0_only report_interval checkpoint_interval tracker tracker_dir
    tracker_project_name tracker_run_id use_torch_compile""".split()
    assert set(fms) <= set(TrainConfig.__dataclass_fields__)


def test_seed_llama_flags_parse_and_validate():
    cfg = config_from_argv(SEED_LLAMA_FLAGS)
    assert cfg.bos_token is None and cfg.tracker is None and cfg.tracker_run_id is None
    assert cfg.learning_rate == 6e-4 and cfg.eos_token == 128000 and cfg.use_torch_compile is True
    assert cfg.selective_checkpointing == "1"
    validate(cfg, world_size=8, local_world_size=8)


def test_seed_yaml_configs_match_their_flags():
    cfg = make_config(os.path.join(ROOT, "configs", "llama3_1.8b_fineweb.yaml"))
    flags = config_from_argv(SEED_LLAMA_FLAGS)
    for name in (
        "model_variant",
        "seq_length",
        "vocab_size",
        "bos_token",
        "eos_token",
        "logical_shards",
        "sharding_strategy",
        "batch_size",
        "num_steps",
        "learning_rate",
        "checkpoint_interval",
    ):
        assert getattr(cfg, name) == getattr(flags, name), name
    for name in ("mamba_2.9b_fineweb", "tele128_llama3_1.8b_fineweb", "demo"):
        make_config(os.path.join(ROOT, "configs", f"{name}.yaml"))  # every field name and value parses


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"batch_size": 3, "learning_rate": "1e-3", "tracker": "None"}))
    cfg = config_from_argv(
        ["--config", str(path), "--batch_size=5", "--selective_checkpointing", "1/3", "--use_dummy_dataset"]
    )
    assert cfg.batch_size == 5 and cfg.learning_rate == 1e-3 and cfg.tracker is None
    assert cfg.selective_checkpointing == "1/3" and cfg.use_dummy_dataset is True


def test_saved_config_round_trips(tmp_path):
    cfg = make_config(batch_size=7, selective_checkpointing="2/3", bos_token=None)
    cfg.save(str(tmp_path / "config.yaml"))
    assert make_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch_sise=4"], "Did you mean --batch_size"),
        (["--learning_rte", "1"], "Did you mean --learning_rate"),
        (["--batch_size=four"], "batch_size='four': expected an integer"),
        (["--batch_size=None"], "batch_size=None is not allowed"),
        (["--use_torch_compile=maybe"], "expected a boolean"),
        (["--selective_checkpointing=__import__('os')"], "expected a fraction"),
        (["--selective_checkpointing=1/0"], "expected a fraction"),
        (["positional"], "unexpected argument"),
    ],
)
def test_parse_errors_name_the_value(argv, match):
    with pytest.raises(ConfigError, match=match):
        config_from_argv(argv)


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modl_variant: llama3_tiny\n")
    with pytest.raises(ConfigError, match="Did you mean --model_variant"):
        make_config(str(path))


@pytest.mark.parametrize(
    "changes, world, match",
    [
        ({"sharding_strategy": "zero3"}, 1, "sharding_strategy='zero3': expected one of fsdp, hsdp, ddp"),
        ({"datasets": "a,b", "weights": "1"}, 1, "weights='1' has 1 values but datasets='a,b' names 2"),
        ({"logical_shards": 960, "num_workers": 1}, 7, "logical_shards=960 is not divisible by"),
        ({"model_variant": "llama3_1.8", "use_dummy_dataset": True}, 1, "unknown model_variant"),
        ({"training_stage": "warm"}, 1, "training_stage='warm'"),
        ({"tracker": "mlflow"}, 1, "tracker='mlflow'"),
        ({"vocab_size": 10**6, "use_dummy_dataset": True}, 1, "vocab_size=1000000"),
        ({"hsdp_shard_size": 3}, 8, "hsdp_shard_size=3: expected a divisor"),
        ({"warmup_steps": 50, "num_steps": 10}, 1, "warmup_steps=50"),
        ({"weights": "1,-2", "datasets": "a,b"}, 1, "'-2' is not a non-negative number"),
    ],
)
def test_validation_errors(changes, world, match):
    cfg = make_config(**{"model_variant": "llama3_tiny", "logical_shards": 8, **changes})
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=world)


def test_cli_reports_errors_before_building_anything():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "avengers.train",
            "--model_variant=llama3_tiny",
            "--sharding_strategy=zero3",
            "--use_dummy_dataset",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 2
    assert "sharding_strategy='zero3': expected one of fsdp, hsdp, ddp" in out.stderr


def test_parse_args_forms():
    cfg_file, over = parse_args(["--config=x.yaml", "--fms.batch_size", "2", "--low-cpu-fsdp"])
    assert cfg_file == "x.yaml" and over == {"batch_size": "2", "low_cpu_fsdp": True}


def test_missing_ckpt_load_path_fails_before_training(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "avengers.train",
            "--model_variant=llama3_tiny",
            "--seq_length=16",
            "--device=cpu",
            "--use_dummy_dataset",
            f"--ckpt_save_path={tmp_path}/run",
            f"--ckpt_load_path={tmp_path}/nothing",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 2
    assert "ckpt_load_path=" in out.stderr and "neither a model file" in out.stderr
