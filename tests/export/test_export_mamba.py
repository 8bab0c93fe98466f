"""Mamba-2 -> Mamba2ForCausalLM, Bamba-layout hybrids -> BambaForCausalLM (logits on the installed
transformers), and a one-sentence refusal for hybrids no transformers architecture computes."""

import json

import pytest
import torch
from checkpoint_helpers import save_checkpoint
from transformers import AutoModelForCausalLM

from avengers.export.__main__ import main as export_main
from avengers.export.mamba import NoHFArchitecture, export_mamba_to_hf, hf_architecture
from avengers.models import get_model_spec

# mamba_9.8b's layout (GQA attention without conv, half rotary, MLP, untied) at test size
SMALL_9_8B = dict(
    d_model=64,
    n_layer=3,
    d_intermediate=96,
    attn_layer_idx=(1,),
    attn_num_heads=4,
    attn_num_heads_kv=2,
    attn_head_dim=16,
    attn_rotary_emb_dim=8,
    d_state=16,
    headdim=16,
    chunk_size=16,
    vocab_size=1001,
)


def _logits_match(spec, tmp_path, architecture: str):
    torch.manual_seed(0)
    model = spec.build().eval()
    export_mamba_to_hf(model, str(tmp_path), variant=spec.name, dtype=torch.float32, eos_token_id=1)
    hf, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == architecture
    assert not any(info.values()), info
    ids = torch.randint(0, spec.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))  # 2.8 chunks
    with torch.no_grad():
        ours, theirs = model(ids), hf.eval()(ids).logits
    assert theirs.shape[-1] == spec.config.padded_vocab
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "changes",
    [{}, {"ngroups": 2, "tie_embeddings": False, "vocab_size": 4001}],
    ids=["mamba2_tiny", "2_groups_untied_padded_vocab"],
)
def test_pure_mamba2_exports_to_mamba2_for_causal_lm(tmp_path, changes):
    spec = get_model_spec("mamba2_tiny").replace(**changes)
    cfg = _logits_match(spec, tmp_path, "Mamba2ForCausalLM")
    c = spec.config
    assert (cfg["n_groups"], cfg["head_dim"], cfg["num_heads"]) == (c.ngroups, c.headdim, c.nheads)
    assert cfg["vocab_size"] == c.padded_vocab and cfg["tie_word_embeddings"] == c.tie_embeddings
    assert cfg["residual_in_fp32"] is True


@pytest.mark.parametrize("name", ["bamba_tiny", "mamba_9.8b"])
def test_bamba_layout_hybrids_export_to_bamba_for_causal_lm(tmp_path, name):
    spec = get_model_spec(name)
    if name == "mamba_9.8b":
        spec = spec.replace(**SMALL_9_8B)
    cfg = _logits_match(spec, tmp_path, "BambaForCausalLM")
    assert cfg["attn_layer_indices"] == list(spec.config.attn_layer_idx)
    assert cfg["rope_theta"] == spec.config.attn_rotary_emb_base


def test_which_variants_have_an_hf_architecture():
    assert hf_architecture(get_model_spec("mamba2_1.3b").config) == "Mamba2ForCausalLM"
    assert hf_architecture(get_model_spec("mamba_9.8b").config) == "BambaForCausalLM"
    for name in ("mamba_1.5b", "mamba_2.9b", "hybrid_tiny"):
        with pytest.raises(NoHFArchitecture) as e:
            hf_architecture(get_model_spec(name).config, name)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(name)
        assert "attn_d_conv=4" in msg and "--format mamba_ssm" in msg


def test_cli_refuses_a_conv_hybrid_in_one_line_before_writing(tmp_path, capsys):
    save_checkpoint(tmp_path / "run", "hybrid_tiny")
    out = tmp_path / "hf"
    assert export_main(["--ckpt", str(tmp_path / "run"), "--out", str(out), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: hybrid_tiny has no Hugging Face architecture")
    assert not out.exists() and not (tmp_path / "hf.partial").exists()
