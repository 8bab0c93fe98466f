"""Reading what a checkpoint folder holds, without loading it: which checkpoints are committed,
whether their files are whole, and which model they were saved from (variant, parameter shapes).

checkpoint.py writes the folders (its docstring has the layout) and loads them; this module only
looks at them, so the trainer can check them before it builds a model.
"""

from __future__ import annotations

import json
import os
import re
import zipfile

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)_ckp$")
_MODEL_PREFIX = "model."  # DCP keys of the model's tensors: "model.<parameter name>"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every committed checkpoint under run_dir/checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_RE.match(name)
            path = os.path.join(root, name)
            if m and os.path.isfile(os.path.join(path, MARKER)):
                found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_checkpoint(path: str) -> str | None:
    """A committed step folder, or the newest one in a run folder; None if there is none."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    found = complete_checkpoints(path)
    return found[-1][1] if found else None


def find_problem(step_dir: str, model_only: bool = False) -> str | None:
    """Why a committed checkpoint cannot be loaded (a missing, unreadable or truncated file), or None;
    model_only: only what loading the weights needs.

    Reads only metadata: DCP's index of where each tensor lies in which file (so a data file shorter
    than its last tensor is found), and the zip directory at the end of each torch.save file.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(step_dir).read_metadata()
    except Exception as e:  # noqa: BLE001 - pickle and file errors of every kind mean "unreadable"
        return f"{os.path.join(step_dir, '.metadata')} is unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) < size:
            return f"{path} is truncated ({os.path.getsize(path)} bytes, its tensors need {size})"
    if model_only:
        return None
    torch_files = ["train_state.pt"] + sorted(f for f in os.listdir(step_dir) if f.startswith(("loader_", "rng_")))
    if not any(f.startswith("loader_state_") for f in torch_files):
        return f"{step_dir} has no loader_state_<rank>.pt"
    for name in torch_files:
        path = os.path.join(step_dir, name)
        try:
            zipfile.ZipFile(path).close()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{path} is missing or truncated ({e})"
    return None


def saved_variant(step_dir: str) -> str | None:
    """The model_variant a checkpoint folder was saved with (metadata.json), if recorded."""
    try:
        with open(os.path.join(step_dir, "metadata.json")) as f:
            return json.load(f).get("model_variant")
    except (OSError, ValueError):
        return None


def saved_shapes(source: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a step folder (DCP index) or a model file (memory-mapped, not read)."""
    import torch

    if os.path.isdir(source):
        from torch.distributed.checkpoint import FileSystemReader

        entries = FileSystemReader(source).read_metadata().state_dict_metadata
        return {
            key[len(_MODEL_PREFIX) :]: tuple(entry.size)
            for key, entry in entries.items()
            if key.startswith(_MODEL_PREFIX) and hasattr(entry, "size")
        }
    obj = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    for key in ("model_state", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {strip_wrapper_prefixes(k): tuple(v.shape) for k, v in obj.items() if hasattr(v, "shape")}


def strip_wrapper_prefixes(key: str) -> str:
    """A parameter name without the prefixes of torch.compile, activation checkpointing and DDP wrappers."""
    for junk in ("_orig_mod.", "_checkpoint_wrapped_module.", "module."):
        key = key.replace(junk, "")
    return key


def shape_mismatch(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """A short description of how two parameter sets differ, or None if every name and shape agrees."""
    missing = sorted(expected.keys() - saved.keys())
    extra = sorted(saved.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & saved.keys() if saved[k] != expected[k])
    if differ:
        k = differ[0]
        return f"{len(differ)} parameter shapes differ, e.g. {k}: {list(saved[k])} saved, {list(expected[k])} expected"
    if missing or extra:
        parts = [f"{len(missing)} parameters missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} unknown (e.g. {extra[0]})"] if extra else []
        return ", ".join(parts)
    return None
