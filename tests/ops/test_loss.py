"""linear_cross_entropy == F.cross_entropy over the full logits: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from avengers.ops.loss import linear_cross_entropy


def _case(dtype, n=37, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, d, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, d, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[0, :5] = -100  # ignored tokens (e.g. padding)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_matches_the_full_logits_loss_and_gradients(chunk):
    hidden, weight, labels = _case(torch.float64)
    ref = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    (2.0 * loss).backward()  # a scaled upstream gradient (gradient accumulation divides the loss)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 2.0 * ref_grads[0])
    torch.testing.assert_close(weight.grad, 2.0 * ref_grads[1])


def test_bf16_within_its_rounding_of_the_fp32_loss():
    hidden, weight, labels = _case(torch.bfloat16, n=64, d=32, v=300)
    ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten())
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=16)
    assert loss.dtype == torch.float32 and abs(float(loss) - float(ref)) < 1e-3 * float(ref)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_without_gradients_and_bad_arguments():
    hidden, weight, labels = _case(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_chunks_match_the_full_logits_path():
    """On CUDA each chunk runs torch.compile'd: loss and gradients as the plain bf16 path within its rounding."""
    hidden, weight, labels = (t.cuda() for t in _case(torch.bfloat16, n=300, d=64, v=1000))
    hidden, weight = (t.detach().requires_grad_() for t in (hidden, weight))
    ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten())
    ref.backward()
    ref_grads = hidden.grad.float(), weight.grad.float()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=256)  # a full and a partial chunk
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(hidden.grad.float(), ref_grads[0], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(weight.grad.float(), ref_grads[1], rtol=2e-2, atol=1e-4)
