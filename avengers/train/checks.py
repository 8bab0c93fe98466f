"""Start-up checks of the trainer that need the model spec or the file system, run before the build.

Each raises ConfigError naming the value and what would be accepted, on every rank alike (the
inputs are the same everywhere), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from avengers.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

ADAMW_BYTES_PER_PARAM = 12  # fp32 weight + exp_avg + exp_avg_sq, as DCP writes them
LOADER_BYTES_PER_TOKEN = 4  # loader states keep buffered lines as int32


def checkpoint_bytes(num_params: int, cfg: TrainConfig, world_size: int) -> int:
    """About how many bytes one checkpoint takes: weights and AdamW moments, plus every rank's
    buffered loader lines (real data only)."""
    loader = 0
    if not cfg.use_dummy_dataset:
        loader = world_size * cfg.shuffle_buffer * (cfg.seq_length + 1) * LOADER_BYTES_PER_TOKEN
    return ADAMW_BYTES_PER_PARAM * num_params + loader


def check_run_folder(path: str, need_bytes: int) -> None:
    """ckpt_save_path can be created and written, and its file system has need_bytes free."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_") as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        raise ConfigError(
            f"ckpt_save_path={path!r} is not a writable folder ({e.strerror or e}: {e.filename or path}); "
            f"choose a folder this user can create files in"
        ) from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(
            f"ckpt_save_path={path!r} has {free / 2**30:.2f} GiB free, but one checkpoint needs about "
            f"{need_bytes / 2**30:.2f} GiB (fp32 weights, AdamW moments and loader state); free space or "
            f"choose another folder"
        )


def note_unused_vocab_size(cfg: TrainConfig, model_vocab: int) -> None:
    """vocab_size only shapes the dummy data; with real data it is ignored, said once."""
    if not cfg.use_dummy_dataset and cfg.vocab_size is not None and cfg.vocab_size != model_vocab:
        log.info(
            "vocab_size=%d is used only with use_dummy_dataset=True; token ids are checked against "
            "model_variant %r's vocabulary of %d",
            cfg.vocab_size,
            cfg.model_variant,
            model_vocab,
        )
