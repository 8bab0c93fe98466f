"""The eval split: picked by doc-id hash, never in the training stream, the same for every run and world."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from corpus_helpers import FIRST_ID, write_corpus

from avengers.data.eval_split import eval_lines, heldout_documents
from avengers.data.heldout import HeldOut, is_heldout
from avengers.data.index import make_plan
from avengers.data.loader import build_dataloader

FRACTION = 0.25


def config(root, **kw) -> types.SimpleNamespace:
    base = dict(
        data_path=str(root),
        file_type="arrow",
        col_name="tokens",
        tokenizer_path=None,
        datasets="a,b",
        weights="1,1",
        seq_length=24,
        bos_token=0,
        eos_token=1,
        bol_token=None,
        eol_token=None,
        strip_tokens="",
        logical_shards=8,
        num_workers=0,
        seed=3,
        batch_size=2,
        shuffle_buffer=4,
        min_doc_length=3,
        eval_fraction=FRACTION,
    )
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    docs = write_corpus(root, {"a": [40, 30, 30], "b": [50, 30]})
    heldout = {k for k in docs if is_heldout(k[1], k[2], FRACTION)}
    return root, docs, heldout


def tokens_of(docs: dict, keys) -> set[int]:
    return {int(t) for k in keys for t in docs[k]}


def test_split_is_about_the_fraction_of_each_dataset(corpus):
    _, docs, heldout = corpus
    for name, n in (("a", 100), ("b", 80)):
        k = sum(1 for d in heldout if d[0] == name)
        assert 0.1 * n < k < 0.4 * n  # 25% expected; binomial spread over 80-100 documents


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2)])
def test_training_stream_skips_exactly_the_heldout_documents(corpus, world, workers):
    root, docs, heldout = corpus
    cfg = config(root, num_workers=workers, logical_shards=8)
    seen: list[int] = []
    for rank in range(world):
        for x, y in build_dataloader(cfg, rank, world, epochs=2):
            seen += torch.cat([x[:, :1], y], dim=1).flatten().tolist()
    seen_set = {t for t in seen if t >= FIRST_ID}
    assert not seen_set & tokens_of(docs, heldout)
    assert seen_set == tokens_of(docs, set(docs) - heldout)  # every other document is still trained on
    assert len([t for t in seen if t >= FIRST_ID]) == 2 * len(tokens_of(docs, set(docs) - heldout))  # 2 epochs


def test_heldout_set_is_the_same_for_every_run_setting(corpus):
    root, docs, heldout = corpus

    def picked(cfg) -> set[tuple]:
        plan = make_plan(cfg)
        held = HeldOut(plan)
        out = set()
        for d, ix in enumerate(plan.indexes):
            for g in range(ix.num_docs):
                if held(d, g):
                    f, i = ix.locate(g)
                    out.add((ix.name, f"/{ix.name}/sub/part-{f:03d}.arrow", i))
        return out

    assert picked(config(root)) == heldout
    assert picked(config(root, seed=99, logical_shards=4, weights="3,1", num_workers=2)) == heldout
    assert picked(config(root, datasets="b", weights="1")) == {k for k in heldout if k[0] == "b"}


def test_eval_lines_hold_only_heldout_documents_in_a_fixed_order(corpus):
    root, docs, heldout = corpus
    cfg = config(root)
    plan = make_plan(cfg)
    lines = eval_lines(plan, 10_000)  # the whole split
    flat = np.concatenate(lines)
    assert all(len(x) == cfg.seq_length + 1 for x in lines)
    assert {int(t) for t in flat if t >= FIRST_ID} == tokens_of(docs, heldout)
    assert int((flat >= FIRST_ID).sum()) == len(tokens_of(docs, heldout))  # each document once
    assert int((flat == 1).sum()) == len(heldout)  # one eos per document
    again = eval_lines(make_plan(config(root, seed=5, logical_shards=4, num_workers=2)), 3)
    assert [x.tolist() for x in again] == [x.tolist() for x in lines[:3]]
    first = next(heldout_documents(plan, 0))
    assert first[0] == 0 and first[-1] == 1  # framed as training frames it: [bos] + doc + [eos]


def test_eval_lines_refuse_a_run_without_a_split(corpus):
    root, _, _ = corpus
    with pytest.raises(ValueError, match="eval_fraction=0.0"):
        eval_lines(make_plan(config(root, eval_fraction=0.0)), 4)
    with pytest.raises(ValueError, match=r"eval_fraction=1.5: expected a number in \[0, 1\)"):
        make_plan(config(root, eval_fraction=1.5))


def test_resume_with_another_eval_fraction_is_refused(corpus):
    root, _, _ = corpus
    loader = build_dataloader(config(root, eval_fraction=0.0), 0, 1)
    next(iter(loader))
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with pytest.raises(ValueError, match="eval_fraction=0.0 but the config has 0.25"):
        build_dataloader(config(root), 0, 1).load_state_dict(state)
    del state["eval_fraction"]  # a state saved before the field existed: nothing was held out
    build_dataloader(config(root, eval_fraction=0.0), 0, 1).load_state_dict(state)
