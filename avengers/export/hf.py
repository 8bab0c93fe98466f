"""Hugging Face model folders: safetensors weights, a config.json that transformers 4.x and 5.x read
alike, generation_config.json.

transformers 5 moved `rope_theta` into `rope_parameters` and renamed `torch_dtype` to `dtype`; 4.x
reads only the old keys and silently falls back to its defaults (RoPE base 10000) without them.
Every config.json written here carries both spellings with the same values. 5.x also writes an
infinite float as {"__float__": "Infinity"}, which 4.x passes on as a dict: the one such value
(Mamba-2's dt limit (0, inf)) is the default of both versions and is left out.
"""

from __future__ import annotations

import json
import os

import torch

CONFIG_NAME = "config.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _owning(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy where it is a slice of a larger tensor (safetensors stores whole storages)."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if whole else t.contiguous().clone()


def write_weights(state: dict[str, torch.Tensor], out_dir: str, dtype: torch.dtype) -> None:
    """model.safetensors (sharded above 5 GB, with its index), every tensor cast to `dtype`.
    Tensors must not share memory: tied weights are written once, under the name the loader expects."""
    from huggingface_hub import save_torch_state_dict

    state = {k: _owning(v.detach().to("cpu", dtype)) for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_torch_state_dict(state, out_dir, max_shard_size="5GB", safe_serialization=True)


def make_config_portable(out_dir: str, dtype: torch.dtype) -> dict:
    """Rewrite out_dir/config.json so both transformers 4.x and 5.x read the same RoPE base and dtype."""
    path = os.path.join(out_dir, CONFIG_NAME)
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if theta is not None:
        cfg["rope_theta"] = theta
        cfg["rope_parameters"] = {"rope_type": "default", **rope, "rope_theta": theta}
    cfg["dtype"] = cfg["torch_dtype"] = dtype_name(dtype)
    if cfg.get("time_step_limit") in ([0.0, {"__float__": "Infinity"}], [0.0, float("inf")]):
        del cfg["time_step_limit"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


def save_hf_folder(config, state: dict[str, torch.Tensor], out_dir: str, dtype: torch.dtype) -> None:
    """A transformers PretrainedConfig and its model's state dict -> a from_pretrained folder."""
    from transformers import GenerationConfig

    write_weights(state, out_dir, dtype)
    config.save_pretrained(out_dir)
    make_config_portable(out_dir, dtype)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
