"""Rebuild the bundled sample corpus and demo tokenizer from the King James Bible (public domain).

    apt-get install bible-kjv          # Debian package with the KJV text and the `bible` reader
    python data/sample/build_sample.py # writes the files listed in data/sample/README.md

One document per chapter. The Law and the early histories (Genesis to Ruth) go into FineWeb-Edu's
parquet schema, the New Testament into Dolma's json.gz schema, so both readers are exercised.
Everything is deterministic: ids are UUID5 of the chapter name, timestamps are fixed.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
VOCAB = 4096  # avengers.models.llama.TINY_VOCAB
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
FINEWEB_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth")
NT_FIRST = "Matthew"
_HEADER = re.compile(r"^([1-3]?\s?[A-Z][A-Za-z ]*?) (\d+)$")
_VERSE = re.compile(r"^\s*\d+ (.*)$")


def read_chapters() -> list[tuple[str, int, str]]:
    """(book, chapter, text) in canonical order, from the `bible` program of Debian's bible-kjv."""
    raw = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    chapters: list[tuple[str, int, list[str]]] = []
    for line in raw.splitlines():
        if m := _HEADER.match(line):
            chapters.append((m.group(1), int(m.group(2)), []))
        elif (m := _VERSE.match(line)) and chapters:
            chapters[-1][2].append(m.group(1).strip())
    return [(b, c, f"{b}, chapter {c}\n\n" + " ".join(v)) for b, c, v in chapters]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(HERE / "tokenizer"))
    return tok


def main() -> None:
    chapters = read_chapters()
    assert len(chapters) == 1189, len(chapters)
    tok = train_tokenizer([t for _, _, t in chapters])
    n_ot = next(i for i, (b, _, _) in enumerate(chapters) if b == NT_FIRST)
    fineweb = [c for c in chapters[:n_ot] if c[0] in FINEWEB_BOOKS]
    dolma = chapters[n_ot:]

    def uid(book: str, ch: int) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kjv/{book}/{ch}"))

    rows = []
    for book, ch, text in fineweb:
        n = len(tok.encode(text, add_special_tokens=False).ids)
        rows.append(
            {
                "text": text,
                "id": f"<urn:uuid:{uid(book, ch)}>",
                "dump": "KJV-1769",
                "url": f"kjv://{book.replace(' ', '_')}/{ch}",
                "file_path": "debian:bible-kjv-text",
                "language": "en",
                "language_score": 1.0,
                "token_count": n,
                "score": 3.0,
                "int_score": 3,
            }
        )
    schema = pa.schema(
        [
            ("text", pa.string()),
            ("id", pa.string()),
            ("dump", pa.string()),
            ("url", pa.string()),
            ("file_path", pa.string()),
            ("language", pa.string()),
            ("language_score", pa.float64()),
            ("token_count", pa.int64()),
            ("score", pa.float64()),
            ("int_score", pa.int64()),
        ]
    )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        HERE / "fineweb-edu-sample.parquet",
        compression="zstd",
        row_group_size=64,
    )
    with gzip.GzipFile(HERE / "dolma-sample.json.gz", "wb", mtime=0) as f:
        for book, ch, text in dolma:
            doc = {
                "id": uid(book, ch),
                "text": text,
                "source": "kjv",
                "added": "2026-01-01T00:00:00.000Z",
                "created": "1769-01-01T00:00:00.000Z",
                "metadata": {"book": book, "chapter": ch},
            }
            f.write((json.dumps(doc) + "\n").encode())
    print(
        f"fineweb-edu-sample.parquet: {len(fineweb)} docs; dolma-sample.json.gz: {len(dolma)} docs; "
        f"bos={tok.token_to_id(BOS)} eos={tok.token_to_id(EOS)}"
    )


if __name__ == "__main__":
    main()
