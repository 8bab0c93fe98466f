"""Llama -> LlamaForCausalLM: logits, a config both transformers 4.x and 5.x read, the tokenizer's BOS."""

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save_checkpoint
from transformers import AutoTokenizer, LlamaForCausalLM

from avengers.export import export_checkpoint
from avengers.export.llama import export_llama_to_hf
from avengers.models import get_model_spec

TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "sample" / "tokenizer"


def test_llama_export_matches_hf_logits(tmp_path):
    torch.manual_seed(0)
    model = get_model_spec("llama3_tiny").build()
    model.init_weights()
    model.eval()
    export_llama_to_hf(model, str(tmp_path), eos_token_id=1, dtype=torch.float32)

    hf, info = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(0, model.config.src_vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf.eval()(ids).logits
    assert (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)


def test_config_carries_rope_base_and_dtype_for_transformers_4_and_5(tmp_path):
    """4.x reads rope_theta / torch_dtype, 5.x rope_parameters / dtype; without its keys 4.x runs RoPE base 10000."""
    model = get_model_spec("llama3_tiny").build()
    export_llama_to_hf(model, str(tmp_path), dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 5e5
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize("bos", [0, None])
def test_exported_tokenizer_adds_bos_exactly_when_training_did(tmp_path, bos):
    save_checkpoint(tmp_path / "run", "llama3_tiny", tokenizer_path=str(TOKENIZER), bos_token=bos, eos_token=1)
    out = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(out)
    plain = tok("The cell membrane", add_special_tokens=False).input_ids
    assert len(plain) > 1
    assert tok("The cell membrane").input_ids == ([bos] if bos is not None else []) + plain
    assert tok.eos_token_id == 1 and tok.bos_token_id == bos
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1 and gen.get("bos_token_id") == bos
