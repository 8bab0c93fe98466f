"""Next-token loss from the last hidden states, without the [tokens, vocab] logits.

`F.cross_entropy(head(h).float(), labels)` holds the logits of every token of the batch, in the
compute dtype and again in fp32 (4 x 4096 tokens x a 128k vocabulary: 8 GiB for the fp32 copy
alone), and keeps them for the backward. `linear_cross_entropy` walks the tokens in chunks: each
chunk's logits are made once, reduced to its loss and to the gradients of that loss with respect
to the chunk's hidden states and the head weight, and dropped; the backward only scales those
gradients. Peak extra memory: one chunk's logits, plus an fp32 copy of the head weight's gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 4096


def _chunk_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed loss and, if wanted, d (summed loss) / d logits = softmax - one-hot (zero on
    ignored tokens) in the logits' dtype. fp32 math; compiled on CUDA into a reduction and one
    element-wise pass over the logits, with no fp32 copy of them."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)
    loss = torch.where(valid, lse - x.gather(1, target[:, None])[:, 0], 0.0).sum()
    if not want_grad:
        return loss, None
    one_hot = torch.arange(x.shape[-1], device=x.device)[None, :] == target[:, None]
    grad = torch.where(valid[:, None], torch.exp(x - lse[:, None]) - one_hot.float(), 0.0)
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_chunk_loss():
    return torch.compile(_chunk_loss, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and, when a gradient is wanted, d loss / d hidden and d loss / d weight, in one walk
    over the chunks in the forward (a chunk's logits are made once); the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ignore_index, want_grads):
        count = (labels != ignore_index).sum().clamp_min(1)
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_grads else None
        chunk_fn = _compiled_chunk_loss() if hidden.is_cuda else _chunk_loss
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            loss, grad_logits = chunk_fn(F.linear(h, weight), y, ignore_index, want_grads)
            loss_sum += loss
            if want_grads:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy was called without gradients and cannot be differentiated")
        scale = grad_loss / count
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over tokens that are not
    `ignore_index`, in fp32, never holding more than `chunk_tokens` tokens' logits.

    hidden [..., D], weight [V, D] (the LM head), labels [...] (long)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the token dims")
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_tokens, ignore_index, want_grads
    )
