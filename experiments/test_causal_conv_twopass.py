"""The two-pass conv backward against the product's kernel and the F.conv1d reference (all
gradients). CUDA (marked gpu), or Triton's CPU interpreter with TRITON_INTERPRET=1 (fp32)."""

import pytest
import torch
from triton_helpers import triton_device

DEVICE = triton_device()

from avengers.models.mamba.causal_conv_triton import triton_causal_conv  # noqa: E402
from avengers.models.mamba.conv import ref_causal_conv  # noqa: E402
from experiments.causal_conv_twopass import twopass_causal_conv  # noqa: E402

pytestmark = pytest.mark.gpu if DEVICE == "cuda" else []


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 70, 150, 4), (1, 33, 64, 3)])
def test_twopass_gradients_match(shape, with_bias, silu):
    B, L, C, width = shape
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(B, L, C + 37, generator=g)  # the mixer's strided column slice
    x = wide[..., 5 : 5 + C].to(DEVICE).transpose(1, 2)
    weight = (0.5 * torch.randn(C, 1, width, generator=g)).to(DEVICE)
    bias = (0.5 * torch.randn(C, generator=g)).to(DEVICE) if with_bias else None
    grad_out = torch.randn(B, C, L, generator=g).to(DEVICE)
    results = []
    for fn in (ref_causal_conv, triton_causal_conv, twopass_causal_conv):
        ins = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
        out = fn(ins[0], ins[1], ins[2] if with_bias else None, silu)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in ins])
    ref, product, twopass = results
    for a, b, r in zip(twopass, product, ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
