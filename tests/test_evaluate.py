import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements.txt)")
from checkpoint_helpers import save_checkpoint  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from avengers.evaluate import AvengersLM, EvalError, build_parser, task_names  # noqa: E402
from avengers.evaluate import main as evaluate_main  # noqa: E402
from avengers.inference.generate import generate  # noqa: E402
from avengers.models import get_model_spec  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "sample" / "tokenizer"


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

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
"""


def test_simple_evaluate_on_a_local_task(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    (tmp_path / "tiny_mc.yaml").write_text(TASK_YAML.format(data=os.path.join(FIXTURES, "tiny_mc.jsonl")))
    out = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert out["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_generation_keeps_the_end_of_a_long_prompt(lm):
    context = " ".join(["the cat sat on the mat"] * 6)  # 36 words > max_length 16
    ids = lm._encode(context)
    want = generate(lm.model, torch.tensor([ids[-(16 - 4) :]]), 4)[0, 12:]
    text = lm.generate_until([_req(context, {"max_gen_toks": 4, "until": []})])[0]
    assert text == lm.tokenizer.decode(want.tolist(), skip_special_tokens=True)


def test_generation_without_room_for_the_prompt_is_refused(lm):
    reqs = [_req("the cat", {"max_gen_toks": 4}), _req("the cat", {"max_gen_toks": 16})]
    with pytest.raises(EvalError, match="max_gen_toks=16 tokens, which leaves no room .* max_length=16"):
        lm.generate_until(reqs)


def test_every_request_type_reports_progress_off_a_terminal(lm, caplog, monkeypatch):
    monkeypatch.setenv("AVENGERS_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="avengers.progress"):
        lm.loglikelihood([_req("the cat", " sat"), _req("water is", " wet")])
        lm.loglikelihood_rolling([_req("the cat sat on the mat")])
        lm.generate_until([_req("the cat", {"max_gen_toks": 2})])
    lines = [r.getMessage() for r in caplog.records]
    for desc, n in (("loglikelihood", 2), ("loglikelihood_rolling", 1), ("generate_until", 1)):
        assert any(line.startswith(f"{desc}: 100% {n}/{n} ") for line in lines), (desc, lines)


def test_tasks_flag_takes_comma_separated_names():
    args = build_parser().parse_args(["--ckpt", "x", "--tasks", "arc_easy,hellaswag"])
    assert task_names(args.tasks) == ["arc_easy", "hellaswag"]
    assert task_names("tele11,tiny_mc")[-2:] == ["social_iqa", "tiny_mc"] and len(task_names("tele11")) == 11


@pytest.fixture(scope="module")
def run_and_tasks(tmp_path_factory):
    """A llama3_tiny checkpoint (context 64) and a folder of local task YAMLs."""
    root = tmp_path_factory.mktemp("eval")
    save_checkpoint(root / "run", "llama3_tiny", tokenizer_path=str(TOKENIZER), seq_length=64, bos_token=0, eos_token=1)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=os.path.join(FIXTURES, "tiny_mc.jsonl")))
    gen = os.path.join(FIXTURES, "tiny_gen.jsonl")
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(name="tiny_gen", data=gen, max_gen_toks=4))
    (tasks / "tiny_gen_long.yaml").write_text(GEN_YAML.format(name="tiny_gen_long", data=gen, max_gen_toks=64))
    return root / "run", tasks


def test_cli_scores_comma_separated_tasks_prints_the_table_and_writes_a_new_json_per_run(
    run_and_tasks, tmp_path, capsys
):
    run, tasks = run_and_tasks
    argv = ["--ckpt", str(run), "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tasks)]
    argv += ["--output_dir", str(tmp_path), "--limit", "2", "--num_fewshot", "0"]
    assert evaluate_main(argv) == 0
    table = capsys.readouterr().out
    assert re.search(r"\|tiny_mc\s*\|", table) and re.search(r"\|tiny_gen\s*\|", table) and "acc" in table
    assert evaluate_main(argv) == 0
    first, second = sorted(tmp_path.glob("results_*.json"))
    assert first.read_bytes() != b"" and first != second
    res = json.loads(first.read_text())
    assert set(res["results"]) == {"tiny_mc", "tiny_gen"}
    assert res["config"]["limit"] == 2 and res["config"]["model_variant"] == "llama3_tiny"
    assert res["n-shot"] == {"tiny_mc": 0, "tiny_gen": 0}
    assert res["n-samples"] == {t: {"original": 3, "effective": 2} for t in ("tiny_mc", "tiny_gen")}
    assert set(res["versions"]) == {"tiny_mc", "tiny_gen"} and "tiny_gen" in res["configs"]
    assert res["avengers"]["tasks"] == ["tiny_mc", "tiny_gen"] and res["avengers"]["num_fewshot"] == 0
    assert res["avengers"]["max_length"] == 64


def test_cli_refuses_generation_longer_than_the_context_before_loading_the_model(run_and_tasks, tmp_path, capsys):
    run, tasks = run_and_tasks
    argv = ["--ckpt", str(run), "--tasks", "tiny_gen_long", "--include_path", str(tasks), "--output_dir", str(tmp_path)]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_gen_toks=64" in err and "--gen_kwargs max_gen_toks=N with N < 64" in err
    assert evaluate_main([*argv, "--gen_kwargs", "max_gen_toks=4", "--limit", "1"]) == 0


def test_cli_unreachable_task_data_is_a_one_line_error_with_a_hint(run_and_tasks, tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run, tasks = run_and_tasks
    argv = ["--ckpt", str(run), "--tasks", "tele11", "--include_path", str(tasks), "--output_dir", str(tmp_path)]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task 'arc_challenge': its data could not be loaded (") and err.count("\n") == 1
    assert "HF_DATASETS_OFFLINE=1" in err and "--include_path" in err
    assert not list(tmp_path.iterdir())
