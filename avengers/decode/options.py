"""How a decode step runs: one options object, chosen once per cache and carried by it.

Paths (each family serves every one of them; a path that does not apply to a step falls back
to the next simpler one, so a cache holds one path for all its batch sizes and contexts):

- `reference`: the per-module torch path; what every other path is tested against.
- `compile`: the element-wise work between a step's projections torch.compile'd (one graph for
  every layer): Llama blocks, telescoping slot updates, Mamba-2 conv steps.
- `triton`: at batch <= GEMV_STEP_MAX_BATCH, each projection as one Triton GEMV with its RMSNorm,
  SwiGLU or residual fused in (all families, where a model's layers have the bias-free layout the
  kernels assume); larger batches as `compile`.
- `gluon`: a Llama's whole batch-1 step as one Gluon kernel (Hopper, caches up to
  LlamaStepKernel.MAX_CACHE_TOKENS tokens, the Triton release it was tested with); other models,
  batches and caches as `triton`.
- `auto` (the default): `reference` on the CPU; on CUDA `gluon` for Llama where it can run, else
  `triton` - the fastest path measured for each family at each batch (docs/results.md).

`attention` picks the decode attention kernel over K/V buffers: the Triton split-K kernel on CUDA
once it has passed a self-test (`auto`), or forced (`triton`, `torch`).

`ssm_state` is the dtype of a Mamba-2 layer's SSM state: `fp32` (the default: every decay and
update accumulates in full precision) or `model`, the model's own dtype (bf16 for a bf16 model, as
mamba_ssm's decode keeps it): half the bytes, and the state is what a step moves at large batches.
Either way the update is computed in fp32; `model` rounds the state once per step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DECODE_PATHS = ("auto", "reference", "compile", "triton", "gluon")
ATTENTION_BACKENDS = ("auto", "triton", "torch")
SSM_STATE_DTYPES = ("fp32", "model")
# The largest batch the Triton GEMV steps serve: above it `compile` is faster (a GEMV program
# re-reads its input tile for every few rows of weights; docs/results.md, decode by path).
GEMV_STEP_MAX_BATCH = 1
# Gluon is Triton's experimental layer and its API moves between releases: the Gluon step is
# tested on this release only, and any other takes the Triton path.
GLUON_TESTED_TRITON = "3.6"


@dataclass(frozen=True)
class DecodeOptions:
    path: str = "auto"
    attention: str = "auto"
    ssm_state: str = "fp32"

    def __post_init__(self) -> None:
        if self.path not in DECODE_PATHS:
            raise ValueError(f"decode path must be one of {DECODE_PATHS}, got {self.path!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"decode attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.ssm_state not in SSM_STATE_DTYPES:
            raise ValueError(f"SSM state dtype must be one of {SSM_STATE_DTYPES}, got {self.ssm_state!r}")

    def resolve(self, family: str, device: torch.device | str) -> DecodeOptions:
        """The concrete path for a model family on a device (`auto` chosen, others checked)."""
        device = torch.device(device)
        path = self.path
        triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if path == "auto":
            if device.type != "cuda":
                path = "reference"
            elif family == "llama" and gluon_runs_here(device):
                path = "gluon"
            else:
                path = "triton"
        elif path in ("triton", "gluon") and not triton_ok:
            raise ValueError(
                f"decode path {path!r} runs Triton kernels: it needs a CUDA device (or TRITON_INTERPRET=1 "
                f"with triton installed), got {device}"
            )
        elif path == "gluon" and not gluon_runs_here(device):
            warnings.warn(
                f"decode path 'gluon' cannot run here ({gluon_unavailable_reason(device)}); using 'triton'",
                stacklevel=2,
            )
            path = "triton"
        return dataclasses.replace(self, path=path)

    @property
    def compiled_cores(self) -> bool:
        """Whether the element-wise work between projections runs torch.compile'd."""
        return self.path in ("compile", "triton", "gluon")

    @property
    def triton_kernels(self) -> bool:
        """Whether the path runs the families' Triton kernels (GEMVs at batch 1, read-outs and state
        updates above it)."""
        return self.path in ("triton", "gluon")

    def gemv_step(self, batch: int) -> bool:
        """Whether a step of `batch` sequences takes a family's Triton GEMV step."""
        return self.triton_kernels and batch <= GEMV_STEP_MAX_BATCH


def gluon_unavailable_reason(device: torch.device) -> str | None:
    """Why the Gluon step cannot run on this device and Triton release (None: it can)."""
    if device.type != "cuda":
        return f"it needs a CUDA device, got {device}"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"it is built for Hopper (sm_90), got {torch.cuda.get_device_name(device)}"
    import triton

    if not triton.__version__.startswith(GLUON_TESTED_TRITON):
        return f"it is tested with Triton {GLUON_TESTED_TRITON}.x, found {triton.__version__}"
    return None


def gluon_runs_here(device: torch.device) -> bool:
    return gluon_unavailable_reason(device) is None
