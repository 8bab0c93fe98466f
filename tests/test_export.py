import torch
from transformers import LlamaForCausalLM

from avengers.export import export_llama_to_hf
from avengers.models import get_model_spec


def test_llama_export_matches_hf_logits(tmp_path):
    torch.manual_seed(0)
    model = get_model_spec("llama3_tiny").build()
    model.init_weights()
    model.eval()
    export_llama_to_hf(model, str(tmp_path), eos_token_id=1, dtype=torch.float32)

    hf = LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.src_vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
