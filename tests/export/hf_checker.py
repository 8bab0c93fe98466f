"""Load exported folders with whatever transformers is first on sys.path and report what it computes.

Runs in a subprocess whose PYTHONPATH puts an older transformers (with its own tokenizers and
huggingface_hub) first, so it imports nothing but torch and transformers:

    python hf_checker.py CASES.json OUT.pt

CASES.json: [{"path", "trust_remote_code", "input_ids", "text", "max_new_tokens"}, ...]. OUT.pt:
{"transformers": version, "cases": [{"architecture", "logits", "text_ids", "generated"}, ...]}.
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def run(case: dict) -> dict:
    remote = case.get("trust_remote_code", False)
    model = AutoModelForCausalLM.from_pretrained(case["path"], torch_dtype=torch.float32, trust_remote_code=remote)
    tokenizer = AutoTokenizer.from_pretrained(case["path"], trust_remote_code=remote)
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits.float()
        prompt = ids[:, : case["prompt_len"]]
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=case["max_new_tokens"], do_sample=False
        )
    return {
        "architecture": type(model).__name__,
        "logits": logits,
        "text_ids": tokenizer(case["text"]).input_ids,
        "generated": generated,
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    torch.save({"transformers": transformers.__version__, "cases": [run(c) for c in cases]}, sys.argv[2])
