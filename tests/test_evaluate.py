import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements.txt)")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from avengers.evaluate import AvengersLM
from avengers.models import get_model_spec

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def lm():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "the cat sat on mat sky river water is wet dry sun rises in east west".split()
    tok.train_from_iterator([" ".join(words)] * 3, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = get_model_spec("llama3_tiny").build()
    model.init_weights()
    return AvengersLM(model, hf_tok, max_length=16, batch_size=2)


def _req(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_matches_manual_and_is_batch_invariant(lm):
    reqs = [_req("the cat sat on the", " mat"), _req("water is", " wet dry"), _req("the sun", " rises in the east")]
    batched = lm.loglikelihood(reqs)
    lm.batch_size = 1
    single = lm.loglikelihood(reqs)
    lm.batch_size = 2
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb

    ctx, cont = lm._encode("water is"), lm._encode(" wet dry")
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(seq[:, :-1]), -1)[0]
    manual = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert batched[1][0] == pytest.approx(manual, abs=1e-4)


def test_rolling_windows_score_every_token_once(lm):
    tokens = list(range(40))
    windows = lm.rolling_windows(tokens)
    assert sum((cont for _, cont in windows), []) == tokens[1:]
    for ctx, cont in windows:
        assert ctx and len(ctx) + len(cont) <= lm.max_length + 1
        assert ctx[-1] + 1 == cont[0]  # context ends right before the scored tokens


def test_rolling_loglikelihood_of_short_text_is_the_full_sequence_score(lm):
    text = "the cat sat on the mat"
    tokens = lm._prefix() + lm._encode(text)
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([tokens[:-1]])), -1)[0]
    expected = sum(logp[i, t].item() for i, t in enumerate(tokens[1:]))
    assert lm.loglikelihood_rolling([_req(text)])[0] == pytest.approx(expected, abs=1e-4)


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_simple_evaluate_on_a_local_task(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(data=os.path.join(FIXTURES, "tiny_mc.jsonl")))
    out = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert out["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
