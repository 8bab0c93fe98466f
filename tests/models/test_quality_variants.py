"""The ~100M variants of the same-data comparison (configs/quality_100m_sample.yaml, docs/quality.md)."""

import pytest

from avengers.models import get_model_spec
from avengers.models.llama import TINY_VOCAB

VARIANTS = {
    "llama3_100m_v4k": "llama",
    "mamba2_100m_v4k": "mamba",
    "hybrid_100m_v4k": "mamba",
    "tele64_100m_v4k": "telescoping",
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_family_has_a_100m_variant_on_the_demo_vocabulary(name):
    spec = get_model_spec(name)
    assert spec.family == VARIANTS[name] and spec.vocab_size == TINY_VOCAB
    assert 90e6 < spec.num_params() < 100e6
    assert spec.max_seq_len >= 2048  # the passkey stage asks for up to 2x the training length of 1024
