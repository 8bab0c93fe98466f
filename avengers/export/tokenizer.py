"""The tokenizer of an export: encodes prompts as training saw documents, loads on transformers 4.x and 5.x.

Training packs `[bos] + tokens + [eos]` per document (bos only when the config sets bos_token), the
tokens encoded without special tokens. The exported tokenizer's post-processor adds exactly that
leading BOS, so `tokenizer(text).input_ids` is what the model was trained on. transformers 5 saves
`tokenizer_class: TokenizersBackend`, a class 4.x does not know; `PreTrainedTokenizerFast` names
the same tokenizer on both.
"""

from __future__ import annotations

import json
import os

TOKENIZER_CONFIG = "tokenizer_config.json"


def _post_processor(original: dict | None, bos: str | None, bos_id: int | None):
    """TemplateProcessing with a leading BOS (or none), after any ByteLevel offset trimming of the original."""
    from tokenizers import processors

    single, pair = ("$A:0", "$A:0 $B:1") if bos is None else (f"{bos}:0 $A:0", f"{bos}:0 $A:0 {bos}:1 $B:1")
    special = [] if bos is None else [(bos, bos_id)]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    parts = (original or {}).get("processors", [original]) if original else []
    byte_level = [p for p in parts if p and p.get("type") == "ByteLevel"]
    if not byte_level:
        return template
    kw = {k: byte_level[0][k] for k in ("add_prefix_space", "trim_offsets", "use_regex") if k in byte_level[0]}
    return processors.Sequence([processors.ByteLevel(**kw), template])


def _token(tok, token_id: int | None, what: str) -> str | None:
    if token_id is None:
        return None
    text = tok.id_to_token(token_id)
    if text is None:
        raise ValueError(f"{what}={token_id} is not in the tokenizer's vocabulary of {tok.get_vocab_size()} tokens")
    return text


def export_tokenizer(
    source: str,
    out_dir: str,
    *,
    bos_token_id: int | None,
    eos_token_id: int | None,
    model_max_length: int | None = None,
) -> None:
    """Write tokenizer.json + tokenizer_config.json for the training config's BOS/EOS ids.

    `source`: a folder holding tokenizer.json, a tokenizer.json file, or a Hub id (as `--tokenizer`
    of avengers.data.prepare)."""
    from transformers import PreTrainedTokenizerFast

    from avengers.data.prepare import load_tokenizer

    tok = load_tokenizer(source)
    bos, eos = _token(tok, bos_token_id, "bos_token"), _token(tok, eos_token_id, "eos_token")
    original = json.loads(tok.to_str()).get("post_processor")
    tok.post_processor = _post_processor(original, bos, bos_token_id)
    kwargs = {"bos_token": bos, "eos_token": eos}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None})
    hf_tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, TOKENIZER_CONFIG)
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = bos is not None
    cfg["add_eos_token"] = False
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
