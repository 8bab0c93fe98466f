"""The eval split's documents (avengers/data/heldout.py picks them), whole or packed into lines."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from avengers.data.heldout import HeldOut
from avengers.data.index import Plan
from avengers.data.stream import Documents, frame_document

PAD = -1  # padding of the last eval line; becomes input 0 and label -100


def heldout_documents(plan: Plan, dataset: int, min_tokens: int = 1) -> Iterator[np.ndarray]:
    """The eval documents of one dataset in document-id order, framed as training frames them
    ([bos] + doc + [eos]), keeping those with at least `min_tokens` tokens."""
    heldout, docs = HeldOut(plan), Documents(plan.spec, plan.indexes[dataset])
    for g in range(plan.indexes[dataset].num_docs):
        if heldout(dataset, g):
            tokens = frame_document(plan.spec, docs(g))
            if tokens is not None and len(tokens) >= min_tokens:
                yield tokens


def eval_lines(plan: Plan, max_lines: int) -> list[np.ndarray]:
    """The first `max_lines` packed lines (seq_length + 1 tokens, with bol/eol) of the eval split.

    Datasets with weight > 0 are interleaved a whole document at a time, each next document from the
    dataset whose share of eval tokens most trails its weight (as training mixes them); the last
    line is padded with PAD. Fewer lines come back when the split runs out.
    """
    spec = plan.spec
    if spec.eval_fraction <= 0:
        raise ValueError(f"eval_fraction={spec.eval_fraction}: no documents are held out (use a value in (0, 1))")
    active = [d for d, w in enumerate(spec.weights) if w > 0]
    streams = {d: heldout_documents(plan, d) for d in active}
    weights = np.array([spec.weights[d] for d in active]) / sum(spec.weights[d] for d in active)
    seen = np.zeros(len(active))
    lo, hi = spec.bol is not None, spec.seq_length + 1 - (spec.eol is not None)
    lines: list[np.ndarray] = []
    line, fill = np.full(spec.seq_length + 1, PAD, dtype=np.int64), lo
    while len(lines) < max_lines and streams:
        k = int(np.argmax(np.where([d in streams for d in active], weights * seen.sum() - seen, -np.inf)))
        doc = next(streams[active[k]], None)
        if doc is None:
            del streams[active[k]]
            continue
        seen[k] += len(doc)
        while len(doc) and len(lines) < max_lines:
            take = doc[: hi - fill]
            line[fill : fill + len(take)] = take
            fill, doc = fill + len(take), doc[len(take) :]
            if fill == hi:
                lines.append(_finish(line, spec.bol, spec.eol))
                line, fill = np.full(spec.seq_length + 1, PAD, dtype=np.int64), lo
    if fill > lo and len(lines) < max_lines:  # a partial last line: no eol, the rest stays PAD
        lines.append(_finish(line, spec.bol, None))
    return lines


def _finish(line: np.ndarray, bol: int | None, eol: int | None) -> np.ndarray:
    if bol is not None:
        line[0] = bol
    if eol is not None:
        line[-1] = eol
    return line
