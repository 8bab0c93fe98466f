"""Every family's `model(ids, labels=...)` (the trainer's loss, no [tokens, vocab] logits) equals
the cross-entropy of its full logits, with the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from avengers.models import get_model_spec


@pytest.mark.parametrize("variant", ["llama3_tiny", "mamba2_tiny", "hybrid_tiny", "tele_tiny"])
def test_labels_path_equals_the_logits_loss(variant):
    torch.manual_seed(0)
    spec = get_model_spec(variant)
    model = spec.build("cpu")
    model.init_weights()
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    ref = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(ids, labels=labels)
    loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
