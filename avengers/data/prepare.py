"""Raw text -> token shards in the fms-fsdp layout (avengers/data/shards.py describes the files).

    python -m avengers.data.prepare --source local --input data/sample/fineweb-edu-sample.parquet \
        --tokenizer data/sample/tokenizer --output data/prepared/sample --dataset fineweb-edu-sample
    python -m avengers.data.prepare --source fineweb-edu --config sample-10BT --output /data/tok
    python -m avengers.data.prepare --source dolma --dolma_sources cc_en_head,wiki --output /data/tok

Sources: `fineweb-edu` (HuggingFaceFW/fineweb-edu streamed with `datasets`), `dolma` (allenai/dolma
v1_7: the URL list from the Hub, each json.gz streamed over HTTP), `local` (parquet, jsonl, json.gz,
jsonl.gz, txt files or folders of them; one txt file = one document).

Shard k holds input documents [k*docs_per_shard, (k+1)*docs_per_shard) after filtering, so the output
is a pure function of the input order and the settings: a rerun skips finished shards (they are
renamed into place only when complete) and redoes partial ones. Tokenization runs in `--workers`
processes (default: all cores), each using the tokenizers library's batch encoder on one core.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from avengers.data import shards
from avengers.progress import progress

log = logging.getLogger(__name__)
SOURCES = ("fineweb-edu", "dolma", "local")
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt")
DEFAULT_TOKENIZER = "meta-llama/Meta-Llama-3-8B"
FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
DOLMA_REPO = "allenai/dolma"
DOLMA_SOURCES = (
    "cc_en_head",
    "cc_en_middle",
    "cc_en_tail",
    "falcon",
    "starcoder",
    "c4",
    "reddit",
    "pes2o",
    "arxiv",
    "wiki",
    "stackexchange",
    "tulu_flan",
    "cc_news_head",
    "cc_news_middle",
    "cc_news_tail",
    "open-web-math",
    "algebraic",
    "books",
    "megawika",
)
TEXT_FIELDS = ("text", "contents")
ON_ERROR = ("raise", "skip")


class PrepareError(ValueError):
    """A bad argument or input; the message names it and what is accepted."""


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(spec: str):
    """A `tokenizers.Tokenizer` from a folder / tokenizer.json / Hub id (Hub only if cached or online)."""
    from tokenizers import Tokenizer

    p = Path(spec)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(p / "tokenizer.json"))
    if p.is_file() and p.suffix == ".json":
        return Tokenizer.from_file(str(p))
    if p.exists():
        raise PrepareError(f"--tokenizer {spec!r}: expected a folder with tokenizer.json or a tokenizer.json file")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
        raise PrepareError(
            f"--tokenizer {spec!r}: not a local folder and could not be loaded from the Hugging Face Hub or its "
            f"cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without network access pass a local "
            f"folder holding tokenizer.json, e.g. --tokenizer data/sample/tokenizer"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise PrepareError(f"--tokenizer {spec!r}: only fast (tokenizers-backed) tokenizers are supported")
    return tok.backend_tokenizer


# ---------------------------------------------------------------- sources


def expand_inputs(inputs: list[str]) -> list[str]:
    files: list[str] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) or [item]
        for m in matches:
            if os.path.isdir(m):
                files += sorted(str(f) for f in Path(m).rglob("*") if f.is_file() and f.name.endswith(LOCAL_SUFFIXES))
            elif os.path.isfile(m):
                if not m.endswith(LOCAL_SUFFIXES):
                    raise PrepareError(f"--input {m!r}: unsupported file type; accepted: {', '.join(LOCAL_SUFFIXES)}")
                files.append(m)
            else:
                raise PrepareError(f"--input {item!r}: no such file, folder or glob match")
    if not files:
        raise PrepareError(f"--input {inputs!r}: no input files (accepted: {', '.join(LOCAL_SUFFIXES)})")
    return files


class BadRecords:
    """What to do with an input record that is not a usable document: raise PrepareError naming the
    file and line (--on_error raise, the default), or skip it and count it (--on_error skip)."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, str] = {}  # reason -> where it was first seen

    def __call__(self, where: str, reason: str, detail: str = "") -> None:
        if not self.skip:
            more = f" ({detail})" if detail else ""
            raise PrepareError(f"{where}: {reason}{more}; fix the input, or pass --on_error skip to skip such records")
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def summary(self) -> str:
        parts = [f"{n} {reason} (first at {self.first[reason]})" for reason, n in self.counts.most_common()]
        return f"skipped {sum(self.counts.values())} input records: {'; '.join(parts)}"


def _json_lines(stream: io.BufferedIOBase, name: str, text_field: str, bad: BadRecords) -> Iterator[str]:
    n = 0
    try:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{name}:{n}"
            try:
                row = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                bad(where, "invalid UTF-8", f"byte {e.start} of the line")
                continue
            except json.JSONDecodeError as e:
                bad(where, "not JSON", str(e))
                continue
            if not isinstance(row, dict):
                bad(where, "not a JSON object", f"a JSON {type(row).__name__}")
                continue
            text = row.get(text_field)
            if text is None:
                bad(where, f"no {text_field!r} field", f"fields: {sorted(row)}")
            elif not isinstance(text, str):
                bad(where, f"{text_field!r} is not a string", f"a JSON {type(text).__name__}")
            else:
                yield text
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz: the rest of the file is lost
        bad(f"{name}:{n + 1}", "unreadable from here on", f"{type(e).__name__}: {e}")


def _read_parquet(path: str, text_field: str, bad: BadRecords) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        bad(path, "not a readable parquet file", f"{type(e).__name__}: {e}")
        return
    names = pf.schema_arrow.names
    col = next((c for c in (text_field, *TEXT_FIELDS) if c in names), None)
    if col is None:
        raise PrepareError(f"{path}: no text column {text_field!r} (columns: {names})")
    kind = pf.schema_arrow.field(col).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        bad(path, f"column {col!r} holds {kind}, not text")
        return
    row = 0
    try:
        for batch in pf.iter_batches(columns=[col], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is not None:
                    yield text
    except (pa.ArrowException, OSError) as e:
        bad(f"{path}: row {row + 1}", "unreadable from here on", f"{type(e).__name__}: {e}")


def read_local(path: str, text_field: str = "text", bad: BadRecords | None = None) -> Iterator[str]:
    bad = bad or BadRecords()
    if path.endswith(".parquet"):
        yield from _read_parquet(path, text_field, bad)
    elif path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from _json_lines(f, path, text_field, bad)
    elif path.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            yield from _json_lines(f, path, text_field, bad)
    else:
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            bad(f"{path}:{line}", "invalid UTF-8", f"byte {e.start} of the file")
            return
        yield text


def _offline_error(what: str, e: Exception) -> PrepareError:
    return PrepareError(
        f"cannot stream {what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). The Hugging "
        f"Face Hub is unreachable from this machine or the dataset is gated; download the files elsewhere and "
        f"run --source local --input <files>"
    )


def read_fineweb(config: str, text_field: str) -> Iterator[str]:
    try:
        from datasets import load_dataset

        ds = load_dataset(FINEWEB_REPO, name=config, split="train", streaming=True)
        it = iter(ds)
        first = next(it)
    except StopIteration:
        return
    except Exception as e:  # noqa: BLE001
        raise _offline_error(f"{FINEWEB_REPO} config {config!r}", e) from None
    yield first[text_field]
    for row in it:
        yield row[text_field]


def dolma_urls(sources: list[str], version: str) -> list[str]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(DOLMA_REPO, f"urls/{version}.txt", repo_type="dataset")
    except Exception as e:  # noqa: BLE001
        raise _offline_error(f"{DOLMA_REPO} urls/{version}.txt", e) from None
    with open(path) as f:
        urls = [u.strip() for u in f if u.strip()]
    picked = [u for u in urls if any(f"/{s}/" in u or f"/{s}-" in u for s in sources)]
    if not picked:
        raise PrepareError(f"--dolma_sources {','.join(sources)}: no URL of {DOLMA_REPO} {version} matches")
    return picked


def read_dolma(sources: list[str], version: str, text_field: str, bad: BadRecords) -> Iterator[str]:
    import urllib.request

    for url in dolma_urls(sources, version):
        try:
            resp = urllib.request.urlopen(url, timeout=60)
        except OSError as e:
            raise _offline_error(url, e) from None
        with resp, gzip.GzipFile(fileobj=resp) as f:
            yield from _json_lines(f, url, text_field, bad)


def iter_source(args: argparse.Namespace, bad: BadRecords) -> Iterator[str]:
    if args.source == "local":
        for path in expand_inputs(args.input):
            yield from read_local(path, args.text_field, bad)
    elif args.source == "fineweb-edu":
        yield from read_fineweb(args.config, args.text_field)
    else:
        yield from read_dolma(args.dolma_sources, args.dolma_version, args.text_field, bad)


# ---------------------------------------------------------------- tokenization workers

_TOK = None


def _init_worker(tok_json: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process; processes give the parallelism
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_str(tok_json)


def tokenize_shard(texts: list[str], out_path: str, min_tokens: int, max_tokens: int | None, batch: int = 256) -> dict:
    """Tokenize, filter and write one shard; returns its stats plus docs_in."""
    docs: list[np.ndarray] = []
    for i in range(0, len(texts), batch):
        for enc in _TOK.encode_batch_fast(texts[i : i + batch], add_special_tokens=False):
            ids = np.array(enc.ids, dtype=np.uint32)
            if ids.size < min_tokens:
                continue
            docs.append(ids[:max_tokens] if max_tokens else ids)
    st = shards.write_shard(out_path, docs)
    st["docs_in"] = len(texts)
    return st


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# ---------------------------------------------------------------- driver


def _settings(args: argparse.Namespace) -> dict:
    # Not on_error: a run that raises stops at the first bad record, so the shards it finished are the
    # ones a skipping run writes too.
    keys = (
        "source",
        "input",
        "config",
        "dolma_sources",
        "dolma_version",
        "text_field",
        "tokenizer",
        "docs_per_shard",
        "min_tokens",
        "max_tokens_per_doc",
        "max_docs",
    )
    return {k: getattr(args, k) for k in keys}


def check_args(args: argparse.Namespace) -> None:
    if args.source not in SOURCES:
        raise PrepareError(f"--source {args.source!r}: expected one of {', '.join(SOURCES)}")
    if args.source == "local":
        if not args.input:
            raise PrepareError("--source local needs --input FILE_OR_FOLDER [...]")
        expand_inputs(args.input)
    if args.source == "dolma":
        bad = [s for s in args.dolma_sources if s not in DOLMA_SOURCES]
        if bad:
            raise PrepareError(f"--dolma_sources {','.join(bad)}: unknown; accepted: {', '.join(DOLMA_SOURCES)}")
    if args.on_error not in ON_ERROR:
        raise PrepareError(f"--on_error {args.on_error!r}: expected one of {', '.join(ON_ERROR)}")
    for name, low in (("docs_per_shard", 1), ("workers", 1), ("min_tokens", 0)):
        if getattr(args, name) < low:
            raise PrepareError(f"--{name} {getattr(args, name)}: expected an integer >= {low}")
    if args.max_tokens_per_doc is not None and args.max_tokens_per_doc < 1:
        raise PrepareError(f"--max_tokens_per_doc {args.max_tokens_per_doc}: expected None or >= 1")


def prepare(args: argparse.Namespace) -> dict[str, dict]:
    check_args(args)
    tok = load_tokenizer(args.tokenizer)
    out_dir = Path(args.output) / args.dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = Path(args.output) / "meta" / f"prepare_{args.dataset.replace('/', '__')}.json"
    settings = _settings(args)
    if info_path.is_file() and not args.overwrite:
        old = json.loads(info_path.read_text()).get("settings")
        if old != settings:
            raise PrepareError(
                f"{out_dir} was prepared with other settings ({info_path}: {old}); pass --overwrite "
                f"to start again or repeat the original command to resume"
            )
    if args.overwrite:
        for f in out_dir.glob("part-*.arrow*"):
            f.unlink()
    for f in out_dir.glob("*.tmp"):
        f.unlink()  # a partial shard from an interrupted run is redone
    info_path.parent.mkdir(parents=True, exist_ok=True)
    info_path.write_text(
        json.dumps(
            {
                "settings": settings,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "bos_eos_candidates": {
                    t: tok.token_to_id(t)
                    for t in ("<|begin_of_text|>", "<|end_of_text|>", "<s>", "</s>")
                    if tok.token_to_id(t) is not None
                },
            },
            indent=1,
        )
    )
    stats: dict[str, dict] = {}
    n_docs = n_tok = 0
    t0 = time.perf_counter()
    bar = progress(total=args.max_docs, unit="doc", disable=args.quiet, desc=f"prepare {args.dataset}")

    def done(name: str, st: dict) -> None:
        nonlocal n_docs, n_tok
        stats[name] = st
        n_docs += st["documents"]
        n_tok += st["tokens"]
        bar.update(st.get("docs_in", st["documents"]))
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{bar.n / dt:,.0f} docs/s {n_tok / dt:,.0f} tok/s")

    bad = BadRecords(skip=args.on_error == "skip")
    texts: Iterable[str] = iter_source(args, bad)
    if args.max_docs:
        texts = (t for _, t in zip(range(args.max_docs), texts))
    pool = None
    if args.workers > 1:
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            args.workers, initializer=_init_worker, initargs=(tok.to_str(),)
        )
    else:
        global _TOK
        _TOK = tok
    pending: collections.deque = collections.deque()
    try:
        empty = True
        for k, chunk in enumerate(_batched(texts, args.docs_per_shard)):
            empty = False
            name = f"part-{k:05d}.arrow"
            path = out_dir / name
            if path.is_file():  # finished by an earlier run
                st = shards.shard_stats(path)
                st["docs_in"] = len(chunk)
                done(name, st)
                continue
            job = (chunk, str(path), args.min_tokens, args.max_tokens_per_doc)
            if pool is None:
                done(name, tokenize_shard(*job))
                continue
            pending.append((name, pool.apply_async(tokenize_shard, job)))
            while len(pending) >= 2 * args.workers or (pending and pending[0][1].ready()):
                nm, res = pending.popleft()
                done(nm, res.get())
        while pending:
            nm, res = pending.popleft()
            done(nm, res.get())
        if empty:
            raise PrepareError(f"--source {args.source} {args.input or args.config or ''}: the input has no documents")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    shards.update_meta(args.output, args.dataset, stats)
    if bad.counts:
        log.warning("%s: %s", args.dataset, bad.summary())
        info = json.loads(info_path.read_text())
        info["skipped_records"] = dict(bad.counts)
        info_path.write_text(json.dumps(info, indent=1))
    dt = time.perf_counter() - t0
    log.info(
        "%s: %d docs, %d tokens in %d shards, %.1f s (%.0f tok/s)",
        args.dataset,
        n_docs,
        n_tok,
        len(stats),
        dt,
        n_tok / max(dt, 1e-9),
    )
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avengers.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help=f"one of {', '.join(SOURCES)}")
    p.add_argument("--output", required=True, help="data_path: shards go to OUTPUT/DATASET, counts to OUTPUT/meta")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset folder name (default: the source name, or the first input's stem for local)",
    )
    p.add_argument("--input", nargs="+", default=None, help="local files, folders or globs")
    p.add_argument("--config", default="sample-10BT", help="fineweb-edu config, e.g. sample-10BT or CC-MAIN-2024-10")
    p.add_argument(
        "--dolma_sources",
        default=",".join(DOLMA_SOURCES),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="CSV of Dolma v1_7 subsets",
    )
    p.add_argument("--dolma_version", default="v1_7")
    p.add_argument("--text_field", default="text", help="text column / JSON field (falls back to 'contents')")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="Hub id or local folder with tokenizer.json")
    p.add_argument("--docs_per_shard", type=int, default=20_000)
    p.add_argument("--min_tokens", type=int, default=1, help="drop documents with fewer tokens")
    p.add_argument("--max_tokens_per_doc", type=int, default=None, help="truncate longer documents")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many input documents")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument(
        "--on_error",
        default="raise",
        help="a record that is not a document (invalid UTF-8, not a JSON object, non-string text, unreadable file): "
        "raise = stop naming file and line; skip = skip it, count and report it",
    )
    p.add_argument("--overwrite", action="store_true", help="delete this dataset's shards and start again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.dataset is None:
        args.dataset = Path(args.input[0]).name.split(".")[0] if args.source == "local" and args.input else args.source
    try:
        prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
