"""Export training checkpoints to the formats the community's tools load.

    python -m avengers.export --ckpt runs/llama3 --out exports/llama3-hf               # LlamaForCausalLM
    python -m avengers.export --ckpt runs/mamba2 --out exports/mamba2-ssm              # mamba_ssm layout
    python -m avengers.export --ckpt runs/mamba2 --out exports/mamba2-hf --format hf   # Mamba2ForCausalLM
    python -m avengers.export --ckpt runs/bamba --out exports/bamba-hf --format hf     # BambaForCausalLM
    python -m avengers.export --ckpt runs/tele --out exports/tele-hf                   # trust_remote_code

Formats per family (the first is the default):
    llama        hf         transformers LlamaForCausalLM (also lm-eval's hf backend, vLLM)
    mamba        mamba_ssm  mamba_ssm's save_pretrained folder (MambaLMHeadModel.from_pretrained)
                 hf         Mamba2ForCausalLM (pure Mamba-2) or BambaForCausalLM (Bamba-layout hybrids)
    telescoping  hf         config.json + modeling_telescoping.py, AutoModelForCausalLM(trust_remote_code=True)

Every export carries the training tokenizer (when the config or --tokenizer names one), set to add
BOS exactly when training did. Settings no format can represent are refused before any weights load.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from avengers.dtypes import parse_dtype
from avengers.export.mamba import NoHFArchitecture, hf_architecture

log = logging.getLogger(__name__)

FORMATS = {"llama": ("hf",), "mamba": ("mamba_ssm", "hf"), "telescoping": ("hf",)}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says why and what would work."""


def resolve_format(family: str, variant: str, fmt: str) -> str:
    formats = FORMATS[family]
    if fmt == "auto":
        return formats[0]
    if fmt not in formats:
        raise ExportError(f"--format {fmt}: {variant} ({family}) exports to {' or '.join(formats)}")
    return fmt


def _loads_with(family: str, fmt: str, arch: str | None) -> str:
    if fmt == "mamba_ssm":
        return "mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel.from_pretrained(path)"
    remote = ", trust_remote_code=True" if family == "telescoping" else ""
    return f"transformers.AutoModelForCausalLM.from_pretrained(path{remote}) -> {arch}"


def _write(out: str, cfg, spec, step_dir: str, fmt: str, tokenizer: str | None, dtype: torch.dtype) -> None:
    from avengers.train.checkpoint import load_model_from_checkpoint

    if tokenizer:
        from avengers.export.tokenizer import export_tokenizer

        try:
            export_tokenizer(tokenizer, out, bos_token_id=cfg.bos_token, eos_token_id=cfg.eos_token)
        except ValueError as e:  # avengers.data.prepare.PrepareError included
            raise ExportError(f"tokenizer {tokenizer}: {e}") from None
    else:
        log.warning("no tokenizer exported: the config has no tokenizer_path; pass --tokenizer")
    model, _ = load_model_from_checkpoint(step_dir, device="cpu")
    ids = dict(bos_token_id=cfg.bos_token, eos_token_id=cfg.eos_token, dtype=dtype)
    if fmt == "mamba_ssm":
        from avengers.models.mamba import save_pretrained

        save_pretrained(model.to(dtype), out)
    elif spec.family == "llama":
        from avengers.export.llama import export_llama_to_hf

        export_llama_to_hf(model, out, **ids)
    elif spec.family == "mamba":
        from avengers.export.mamba import export_mamba_to_hf

        export_mamba_to_hf(model, out, variant=cfg.model_variant, max_seq_len=spec.max_seq_len, **ids)
    else:
        from avengers.export.telescoping import export_telescoping_to_hf

        export_telescoping_to_hf(model, out, **ids)


def export_checkpoint(
    ckpt: str, out: str, format: str = "auto", tokenizer: str | None = None, dtype: str = "bf16"
) -> str:
    """Export a run folder (its newest checkpoint) or a checkpoint step folder to the new folder `out`."""
    from avengers.config import make_config
    from avengers.models import get_model_spec
    from avengers.train.checkpoint import resolve_checkpoint

    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError as e:
        raise ExportError(f"--dtype: {e}") from None
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ExportError(f"--out {out} exists and is not an empty folder; name a new folder (nothing was written)")
    step_dir = resolve_checkpoint(ckpt)
    if step_dir is None:
        raise ExportError(f"--ckpt {ckpt}: no complete checkpoint (a run folder or a checkpoints/step_N_ckp folder)")
    cfg = make_config(os.path.join(step_dir, "config.yaml"))
    spec = get_model_spec(cfg.model_variant)
    fmt = resolve_format(spec.family, cfg.model_variant, format)
    arch = None
    if fmt == "hf":
        arch = {"llama": "LlamaForCausalLM", "telescoping": "TelescopingForCausalLM"}.get(spec.family)
        if spec.family == "mamba":
            try:
                arch = hf_architecture(spec.config, cfg.model_variant)
            except NoHFArchitecture as e:
                raise ExportError(str(e)) from None

    partial = out.rstrip("/") + ".partial"  # renamed to `out` once complete
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        _write(partial, cfg, spec, step_dir, fmt, tokenizer or cfg.tokenizer_path, torch_dtype)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked above
    os.replace(partial, out)
    loads = _loads_with(spec.family, fmt, arch)
    log.info("exported %s (%s, %s) to %s: %s", step_dir, cfg.model_variant, fmt, out, loads)
    return out


__all__ = ["FORMATS", "ExportError", "export_checkpoint", "resolve_format"]
