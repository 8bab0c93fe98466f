"""The depthwise causal conv of Mamba-2 mixers (and of hybrid attention inputs), in plain torch:
the reference the fast kernels (causal_conv1d, causal_conv_triton.py) are tested against."""

from __future__ import annotations

import torch.nn.functional as F


def ref_causal_conv(x, weight, bias, silu: bool):
    """Depthwise causal conv: x [b, d, l], weight [d, 1, w] -> [b, d, l] in x's layout.

    Like causal_conv1d and the Triton kernel, a channel-last x (a transposed [b, l, d] view) gives a
    channel-last output, so the callers' q/k/v or x/B/C slices keep unit stride per channel (SDPA's
    fused kernels refuse anything else and fall back to materialising the score matrix)."""
    w = weight.shape[-1]
    out = F.conv1d(x, weight, bias, padding=w - 1, groups=weight.shape[0])[..., : x.shape[-1]]
    out = F.silu(out) if silu else out
    return out.transpose(1, 2).contiguous().transpose(1, 2) if x.stride(1) == 1 else out
