"""Fault injection (issue 25): bad input fails fast with a clear error, and a good checkpoint is never lost.

Faults come from the test side only: NaN losses, abrupt exits and a full disk are patched into the
test's own process (train_helpers.run_training, unittest.mock), damaged files are written here, and
the loader-worker test kills a real `python -m avengers.train` from outside.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from train_helpers import read_metrics, run_training

from avengers.config import ConfigError, make_config, validate
from avengers.data import shards
from avengers.data.loader import build_dataloader, validate_data_config
from avengers.data.prepare import main as prepare_main
from avengers.models import get_model_spec
from avengers.train.checkpoint import Checkpointer, complete_checkpoints, load_model_from_checkpoint
from avengers.train.data import DummyLoader
from avengers.train.schedule import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "sample" / "tokenizer"
VOCAB = 4096  # llama3_tiny


def write_dataset(data_path: Path, name: str, docs: list[np.ndarray], meta: bool = True) -> Path:
    """One shard of `docs` as data_path/name/part-0.arrow, with its meta rows (counts and max id)."""
    path = data_path / name / "part-0.arrow"
    stats = shards.write_shard(path, docs)
    if meta:
        shards.update_meta(data_path, name, {"part-0.arrow": stats})
    return path


def random_docs(n: int, seed: int = 0, high: int = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, high, int(rng.integers(20, 120))).astype(np.uint32) for _ in range(n)]


def data_flags(data_path: Path, **kw) -> dict:
    flags = dict(
        use_dummy_dataset=False,
        data_path=str(data_path),
        datasets="web",
        logical_shards=4,
        num_workers=0,
        eos_token=0,
        shuffle_buffer=0,
    )
    return {**flags, **kw}


def loader_config(data_path: Path, **kw):
    return make_config(model_variant="llama3_tiny", seq_length=32, batch_size=2, **data_flags(data_path, **kw))


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    spec = get_model_spec("llama3_tiny")
    model = spec.build("cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randint(0, VOCAB, (1, 8))).sum().backward()
    optimizer.step()  # so that the optimizer has state to save
    return model, optimizer, build_scheduler(optimizer, 10, "initial", 0, 0.1)


def save(run: Path, step: int, model, optimizer, scheduler, keep_last: int = 3) -> str:
    cfg = make_config(model_variant="llama3_tiny", ckpt_save_path=str(run), ckpt_keep_last=keep_last)
    return Checkpointer(cfg, 0, 1).save(step, step, model, optimizer, scheduler, DummyLoader(2, 16, VOCAB, 0, 1))


# ---------------------------------------------------------------- 1. NaN / inf


def test_nonfinite_gradients_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path, capfd):
    """Gradients NaN from step 3: keep-last-1 used to leave only NaN weights."""
    codes = run_training(
        world=1,
        ckpt_save_path=str(tmp_path),
        nan_at_steps=(3, 4, 5, 6, 7, 8),
        num_steps=8,
        checkpoint_interval=2,
        ckpt_keep_last=1,
        report_interval=100,  # so the check before step 4's save is the one that stops it
    )
    err = capfd.readouterr().err
    assert codes == [1]
    assert "avengers.train: error: steps 3-4: non-finite gradient norm (NaN/inf), 2 step(s) in a row." in err
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2]
    model, _ = load_model_from_checkpoint(str(tmp_path))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_diverging_run_stops_with_finite_checkpoints_only(tmp_path, capfd):
    """The issue's repro, a real blow-up: LR 1e6 turns the gradients non-finite within a few steps
    (which step depends on the platform's numerics); whatever was saved before is finite."""
    codes = run_training(
        world=1,
        ckpt_save_path=str(tmp_path),
        learning_rate=1e6,
        warmup_steps=0,
        num_steps=8,
        checkpoint_interval=2,
        ckpt_keep_last=1,
    )
    assert codes == [1]
    assert "non-finite gradient norm (NaN/inf)" in capfd.readouterr().err
    for _, path in complete_checkpoints(str(tmp_path)):
        model, _ = load_model_from_checkpoint(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_steps_skips_updates_then_stops_past_the_limit(tmp_path, capfd):
    run = tmp_path / "skip"
    flags = dict(num_steps=6, checkpoint_interval=2, ckpt_keep_last=0, skip_nonfinite_steps=2)
    assert run_training(world=1, ckpt_save_path=str(run), nan_at_steps=(3, 4), **flags) == [0]
    ckpt = run / "checkpoints"
    for step in (2, 4, 6):
        dcp_to_torch_save(str(ckpt / f"step_{step}_ckp"), str(tmp_path / f"{step}.pt"))
    s2, s4, s6 = (torch.load(tmp_path / f"{s}.pt", weights_only=False) for s in (2, 4, 6))
    for key, value in s2["model"].items():  # steps 3 and 4 were skipped: weights and moments unchanged
        assert torch.equal(s4["model"][key], value), key
        assert not torch.equal(s6["model"][key], value), key
    for key, state in s2["optim"]["state"].items():
        assert int(s4["optim"]["state"][key]["step"]) == int(state["step"]) == 2
        assert torch.equal(s4["optim"]["state"][key]["exp_avg"], state["exp_avg"])
    m = read_metrics(run)
    assert [m[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
    assert m[3]["loss"] is None and m[5]["loss"] > 0
    capfd.readouterr()

    assert run_training(world=1, ckpt_save_path=str(tmp_path / "stop"), nan_at_steps=(3, 4, 5), **flags) == [1]
    err = capfd.readouterr().err
    assert "steps 3-5: non-finite gradient norm (NaN/inf), 3 step(s) in a row (skip_nonfinite_steps=2 allows 2)" in err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process without a group: intended
def test_a_checkpoint_with_nonfinite_weights_is_never_committed(tmp_path):
    model, optimizer, scheduler = model_and_optimizer()
    good = save(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"step 4: the weights or optimizer state hold NaN/inf"):  # CheckpointError
        save(tmp_path, 4, model, optimizer, scheduler, keep_last=1)
    assert [p for _, p in complete_checkpoints(str(tmp_path))] == [good]  # retention did not run
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2_ckp"]


# ---------------------------------------------------------------- 2. empty documents


def test_dataset_of_empty_documents_is_named_before_training(tmp_path):
    write_dataset(tmp_path, "web", random_docs(40))
    write_dataset(tmp_path, "empty", [np.zeros(0, np.uint32)] * 30)
    cfg = loader_config(tmp_path, datasets="web,empty", weights="20,1")
    with pytest.raises(ValueError, match=r"dataset 'empty': its 30 documents .* are all empty"):
        validate_data_config(cfg, 1, VOCAB)


def _first_batch_or_error(cfg, conn) -> None:
    try:
        next(iter(build_dataloader(cfg, 0, 1)))
        conn.send("a batch")
    except ValueError as e:
        conn.send(str(e))


def test_documents_too_short_to_use_fail_instead_of_hanging(tmp_path):
    """Non-empty but all shorter than min_doc_length: the loader used to spin forever on this dataset."""
    import multiprocessing as mp

    write_dataset(tmp_path, "web", random_docs(40))
    write_dataset(tmp_path, "short", [np.array([7], np.uint32)] * 30)
    cfg = loader_config(tmp_path, datasets="web,short", weights="20,1", min_doc_length=3)
    validate_data_config(cfg, 1, VOCAB)  # its meta counts tokens, so only reading finds out
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_first_batch_or_error, args=(cfg, send))
    child.start()
    got = recv.recv() if recv.poll(30) else "no answer in 30 s (hung)"
    child.kill()
    child.join()
    assert "dataset 'short': none of the 30 documents in logical shards 0-3 (loader worker 0)" in got


# ---------------------------------------------------------------- 3. orphaned loader workers


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_loader_workers_exit_when_the_trainer_is_killed(tmp_path, sig):
    """With logical_shards=960 a worker's messages fill its pipe; an orphan then blocked forever and kept
    the trainer's stdout open, so `train.sh | tee log` never returned."""
    write_dataset(tmp_path / "data", "web", random_docs(300))
    flags = {
        **data_flags(tmp_path / "data", logical_shards=960, num_workers=1),
        "model_variant": "llama3_tiny",
        "device": "cpu",
        "use_torch_compile": False,
        "seq_length": 64,
        "batch_size": 2,
        "num_steps": 10**6,
        "report_interval": 1,
        "checkpoint_interval": 10**6,
        "ckpt_save_path": str(tmp_path / "run"),
        "sharding_strategy": "fsdp",
    }
    trainer = subprocess.Popen(
        [sys.executable, "-m", "avengers.train", *(f"--{k}={v}" for k, v in flags.items())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    workers: list[int] = []
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and trainer.poll() is None:
            workers = _children(trainer.pid)
            if workers and metrics.is_file() and metrics.read_text().count("\n") >= 2:
                break  # training with a live worker
            time.sleep(0.1)
        assert workers and trainer.poll() is None, trainer.stdout.read().decode()[-3000:]
        trainer.send_signal(sig)
        trainer.wait(30)
        eof = threading.Event()  # every holder of the pipe's write end is gone
        threading.Thread(target=lambda: (trainer.stdout.read(), eof.set()), daemon=True).start()
        assert eof.wait(20), "the trainer's stdout is still held open"
        deadline = time.monotonic() + 10  # a killed process closes its files a moment before it is a zombie
        while [w for w in workers if _alive(w)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)]
    finally:
        for pid in [trainer.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 4. token ids and corrupt shards


def test_shard_without_a_recorded_max_id_is_scanned_in_full_once(tmp_path, caplog):
    docs = random_docs(100)
    docs[50] = np.array([5, VOCAB + 9, 6], np.uint32)  # not among the 8 documents the old check sampled
    path = write_dataset(tmp_path, "web", docs)
    (tmp_path / "meta" / shards.STATS_FILE).unlink()  # as from a tool that writes only counts
    caplog.set_level(logging.INFO, logger="avengers.data.loader")
    with pytest.raises(ValueError, match=rf"{path}: token id {VOCAB + 9} >= vocab_size={VOCAB}"):
        validate_data_config(loader_config(tmp_path), 1, VOCAB)
    assert "checking the token ids of 1 shard(s)" in caplog.text and "1/1 shards" in caplog.text
    validate_data_config(loader_config(tmp_path), 1, VOCAB + 10)  # now it fits: the scan is recorded
    assert shards.read_meta(tmp_path)["/web/part-0.arrow"].max_token_id == VOCAB + 9
    caplog.clear()
    validate_data_config(loader_config(tmp_path), 1, VOCAB + 10)
    assert "checking the token ids" not in caplog.text


def test_corrupt_record_batch_is_named_with_file_and_document(tmp_path, capfd):
    docs = random_docs(20, high=1000)
    docs[13] = np.arange(3000, 3040, dtype=np.uint32)
    path = write_dataset(tmp_path, "web", docs)  # meta records the true max id, 2999 < vocab
    raw = path.read_bytes()
    at = raw.index(docs[13][:4].tobytes())
    path.write_bytes(raw[:at] + b"\xff" * 16 + raw[at + 16 :])  # bit rot inside document 13's body
    flags = data_flags(tmp_path, num_workers=1, logical_shards=1, shuffle_buffer=0)
    assert run_training(world=1, ckpt_save_path=str(tmp_path / "run"), num_steps=500, **flags) == [1]
    err = capfd.readouterr().err
    assert f"{path}, document 13 (dataset 'web') holds token id 4294967295 >= the model's vocabulary of {VOCAB}" in err
    assert "index out of range" not in err


# ---------------------------------------------------------------- 5. and 10. the checkpoint folder


def test_unwritable_ckpt_save_path_is_a_clear_error_before_anything_runs(tmp_path, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run_training(world=1, ckpt_save_path=str(blocker / "run"), num_steps=1) == [2]
    err = capfd.readouterr().err
    assert f"avengers.train: error: ckpt_save_path='{blocker}/run' is not a writable folder (Not a directory" in err
    assert "Traceback" not in err


def test_start_checks_room_for_one_checkpoint(tmp_path):
    from avengers.train import checks

    spec = get_model_spec("llama3_tiny")
    dummy = make_config(model_variant="llama3_tiny", use_dummy_dataset=True)
    real = make_config(model_variant="llama3_tiny", seq_length=64, shuffle_buffer=100)
    assert checks.checkpoint_bytes(spec.num_params(), dummy, 2) == 12 * 5_048_576
    assert checks.checkpoint_bytes(spec.num_params(), real, 2) == 12 * 5_048_576 + 2 * 100 * 65 * 4
    checks.check_run_folder(str(tmp_path / "run"), need_bytes=1)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ConfigError, match=r"GiB free, but one checkpoint needs about .* GiB \(fp32 weights"):
        checks.check_run_folder(str(tmp_path / "run"), need_bytes=free + 2**40)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_save_on_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    model, optimizer, scheduler = model_and_optimizer()
    good = save(tmp_path, 2, model, optimizer, scheduler, keep_last=1)
    real_save = torch.save

    def disk_full_for_loader_state(obj, f, *args, **kwargs):
        if str(f).endswith("loader_state_0.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    with mock.patch.object(torch, "save", disk_full_for_loader_state):
        with pytest.raises(RuntimeError, match=r"checkpoint of step 4: no space left on the device of .* GiB free"):
            save(tmp_path, 4, model, optimizer, scheduler, keep_last=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2_ckp"]  # the partial save is gone
    assert complete_checkpoints(str(tmp_path)) == [(2, good)]


def test_a_full_disk_on_one_rank_stops_every_rank_instead_of_hanging(tmp_path, capfd):
    """2 processes: rank 1 cannot write its part of step 4's checkpoint; rank 0 used to wait for it forever."""
    codes = run_training(
        ckpt_save_path=str(tmp_path), num_steps=6, checkpoint_interval=2, disk_full_in_save=(4, 1), timeout=60
    )
    err = capfd.readouterr().err
    assert codes == [1, 1]
    assert err.count("avengers.train: error: checkpoint of step 4: no space left on the device of") == 2
    assert "rank 1: OSError: [Errno 28] No space left on device" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2_ckp"]


# ---------------------------------------------------------------- 6. seq_length beyond what the model takes


def test_seq_length_past_llama_rope_tables_fails_before_the_build():
    cfg = make_config(model_variant="llama3_tiny", seq_length=1025, use_dummy_dataset=True)
    with pytest.raises(ConfigError, match="seq_length=1025: model_variant 'llama3_tiny' cannot take sequences longer"):
        validate(cfg)


@pytest.mark.parametrize("variant", ["mamba2_tiny", "hybrid_tiny", "tele_tiny"])
def test_seq_length_past_max_seq_len_trains_without_a_warning_where_the_model_takes_it(variant, tmp_path, capfd):
    length = get_model_spec(variant).max_seq_len + 40
    flags = dict(model_variant=variant, seq_length=length, batch_size=1, num_steps=1)
    assert run_training(world=1, ckpt_save_path=str(tmp_path), **flags) == [0]
    assert "max_seq_len" not in capfd.readouterr().err
    assert read_metrics(tmp_path)[1]["loss"] > 0


# ---------------------------------------------------------------- 7. a checkpoint of another variant


def test_checkpoint_of_another_variant_fails_before_the_build_and_keeps_config_yaml(tmp_path, capfd):
    run = tmp_path / "run"
    assert run_training(world=1, model_variant="mamba2_tiny", ckpt_save_path=str(run), num_steps=1) == [0]
    before = (run / "config.yaml").read_bytes()
    capfd.readouterr()
    assert run_training(world=1, model_variant="llama3_tiny", ckpt_save_path=str(run), num_steps=2) == [2]
    err = capfd.readouterr().err
    assert (
        f"avengers.train: error: ckpt_save_path='{run}' holds a checkpoint of model_variant 'mamba2_tiny', "
        f"but this run is 'llama3_tiny' (" in err
    )
    assert "use --model_variant=mamba2_tiny or another ckpt_save_path" in err
    assert "parallelize:" not in err  # nothing was built
    assert (run / "config.yaml").read_bytes() == before


# ---------------------------------------------------------------- 8. a damaged COMPLETE checkpoint


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    assert run_training(world=1, ckpt_save_path=str(run), num_steps=4, checkpoint_interval=2) == [0]
    return run


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "train_state.pt"])
def test_truncated_checkpoint_falls_back_to_the_previous_one(run_with_two_checkpoints, tmp_path, damaged, capfd):
    run = tmp_path / "run"
    shutil.copytree(run_with_two_checkpoints, run)
    path = run / "checkpoints" / "step_4_ckp" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    first = read_metrics(run)
    capfd.readouterr()
    assert run_training(world=1, ckpt_save_path=str(run), num_steps=4, checkpoint_interval=2) == [0]
    out, err = capfd.readouterr()
    assert f"checkpoint {run}/checkpoints/step_4_ckp is damaged ({path} is" in err
    assert "falling back to the previous one" in err
    assert f"resumed from {run}/checkpoints/step_2_ckp (step 2)" in out
    again = read_metrics(run)  # steps 3 and 4 were trained again from step 2, exactly as the first time
    assert [again[s]["loss"] for s in (3, 4)] == [first[s]["loss"] for s in (3, 4)]
    assert [s for s, _ in complete_checkpoints(str(run))] == [2, 4]
    load_model_from_checkpoint(str(run))  # the re-saved step 4 is whole


def test_every_checkpoint_damaged_is_an_error_naming_them_not_a_fresh_start(run_with_two_checkpoints, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(run_with_two_checkpoints, run)
    damaged = [run / "checkpoints" / f"step_{s}_ckp" / "__0_0.distcp" for s in (2, 4)]
    for path in damaged:
        path.write_bytes(path.read_bytes()[:100])
    metrics = (run / "metrics.jsonl").read_text()
    capfd.readouterr()
    assert run_training(world=1, ckpt_save_path=str(run), num_steps=6, checkpoint_interval=2) == [1]
    err = capfd.readouterr().err
    assert f"avengers.train: error: every complete checkpoint under {run}/checkpoints is damaged (" in err
    assert all(f"{path} is truncated (100 bytes" in err for path in damaged)
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing was trained


# ---------------------------------------------------------------- 9. prepare on bad records

GOOD = b'{"text": "a good line"}\n'


@pytest.mark.parametrize(
    "name, content, where, reason",
    [
        ("utf8.jsonl", GOOD + b'{"text": "caf\xe9"}\n', ":2", "invalid UTF-8"),
        ("list.jsonl", GOOD + b"[1, 2]\n", ":2", "not a JSON object (a JSON list)"),
        ("number.jsonl", GOOD + b'{"text": 5}\n', ":2", "'text' is not a string (a JSON int)"),
        ("broken.jsonl", GOOD + b'{"text": "unterminated\n', ":2", "not JSON"),
        ("latin1.txt", b"line one\nline \xe9two\n", ":2", "invalid UTF-8"),
        ("garbage.parquet", b"PAR1 this is not a parquet file", "", "not a readable parquet file"),
    ],
)
def test_prepare_names_file_and_line_of_a_bad_record(tmp_path, capsys, name, content, where, reason):
    bad = tmp_path / name
    bad.write_bytes(content)
    argv = ["--source", "local", "--input", str(bad), "--output", str(tmp_path / "out"), "--dataset", "d"]
    assert prepare_main([*argv, "--tokenizer", str(TOKENIZER), "--workers", "1", "--quiet"]) == 2
    assert f"error: {bad}{where}: {reason}" in capsys.readouterr().err


def test_prepare_on_error_skip_counts_and_reports_skipped_records(tmp_path, caplog):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(GOOD + b'{"text": "caf\xe9"}\n[1]\n{"text": null}\n{"text": 7}\n' + GOOD)
    argv = ["--source", "local", "--input", str(src), "--output", str(tmp_path / "out"), "--dataset", "d"]
    caplog.set_level(logging.WARNING, logger="avengers.data.prepare")
    assert prepare_main([*argv, "--tokenizer", str(TOKENIZER), "--workers", "1", "--quiet", "--on_error", "skip"]) == 0
    assert shards.read_meta(tmp_path / "out")["/d/part-00000.arrow"].documents == 2
    assert "d: skipped 4 input records: " in caplog.text
    for reason, line in (("invalid UTF-8", 2), ("not a JSON object", 3), ("no 'text' field", 4)):
        assert f"1 {reason} (first at {src}:{line})" in caplog.text


# ---------------------------------------------------------------- 10. vocab_size


def test_vocab_size_is_checked_only_for_dummy_data_and_says_so():
    real = make_config(model_variant="llama3_tiny", seq_length=16, vocab_size=128256, logical_shards=8)
    validate(real)  # the seed's --vocab_size=128256 with real data and a small model: not an error
    dummy = make_config(model_variant="llama3_tiny", seq_length=16, vocab_size=128256, use_dummy_dataset=True)
    with pytest.raises(ConfigError, match=r"vocab_size=128256 with use_dummy_dataset=True: the dummy token ids"):
        validate(dummy)
