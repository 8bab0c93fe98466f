"""Telescoping -> a trust_remote_code folder: logits and greedy generation equal ours, the cache stays
C slots per layer however long the text, and the modeling file needs neither avengers nor anything
beyond torch and transformers."""

import ast
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from avengers.export.telescoping import MODELING_FILE, export_telescoping_to_hf
from avengers.inference.generate import generate
from avengers.models import get_model_spec

VARIANTS = {
    "tele_tiny": {},
    # a full-attention layer (its own KV cache), the WISQ gate, masked EMPTY slots, a soft cap
    "hybrid_wisq_masked_capped": dict(
        tele_full_attn_layers=(1,), tele_gate="wisq", tele_mask_empty=True, tele_softcap=20.0
    ),
}


def _export(tmp_path, changes):
    spec = get_model_spec("tele_tiny").replace(**changes) if changes else get_model_spec("tele_tiny")
    torch.manual_seed(0)
    model = spec.build()
    model.init_weights()
    with torch.no_grad():  # read-time gains away from their init of 1, so a dropped gain shows
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] == model.config.emb_dim // model.config.nheads:
                p.uniform_(0.5, 1.5)
    export_telescoping_to_hf(model.eval(), str(tmp_path), eos_token_id=1, dtype=torch.float32)
    hf, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert type(hf).__name__ == "TelescopingForCausalLM" and not any(info.values()), info
    return model, hf.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_remote_code_logits_and_greedy_generation_equal_ours(tmp_path, name):
    model, hf = _export(tmp_path, VARIANTS[name])
    ids = torch.randint(2, 4096, (2, 150), generator=torch.Generator().manual_seed(1))  # beyond the C=16 window
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, model(ids), atol=2e-4, rtol=1e-4)
        prompt = ids[:, :40]
        ours = generate(model, prompt, 30)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    assert torch.equal(theirs, ours)


def test_decode_cache_stays_constant_and_steps_match_the_full_forward(tmp_path):
    model, hf = _export(tmp_path, VARIANTS["tele_tiny"])
    ids = torch.randint(2, 4096, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        out = hf(ids[:, :10], use_cache=True)
        state = out.tele_state
        shapes = {i: tuple(s.k.shape) for i, s in state.layers.items()}
        assert shapes == {i: (1, 4, 16, 32) for i in range(4)}  # [batch, KV heads, C slots, head_dim]
        steps = [out.logits]
        for t in range(10, 120):
            steps.append(hf(ids[:, t : t + 1], tele_state=state, use_cache=True).logits)
    assert state.seq_len == 120
    assert {i: tuple(s.k.shape) for i, s in state.layers.items()} == shapes
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=1e-4)


def test_padded_batches_are_refused(tmp_path):
    _, hf = _export(tmp_path, {})
    ids = torch.randint(2, 4096, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="no padding support"):
        hf(ids, attention_mask=mask)


def test_modeling_file_imports_only_torch_transformers_and_the_standard_library():
    tree = ast.parse(open(MODELING_FILE).read())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers"}
