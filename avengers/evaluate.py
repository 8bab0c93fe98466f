"""lm-evaluation-harness on any registry model, from a training run or checkpoint folder.

    python -m avengers.evaluate --ckpt runs/llama3 --tasks arc_easy,hellaswag --batch_size 16
    python -m avengers.evaluate --ckpt runs/tele --tasks tele11 --limit 100

Every family (Llama, Mamba-2, hybrids, telescoping) is scored through the same `AvengersLM`
adapter, with one full forward per batch of requests, so scores are comparable across families.
`--tasks tele11` is the 11 zero-shot tasks of the original telescoping comparison. Each run prints
lm-eval's results table and writes its full results (configs, task versions, n-shot, sample counts,
limit, seeds) to a new `results_<time>.json` under `--output_dir` (default: <ckpt>/eval).

Task data comes from the Hugging Face Hub through `datasets`; offline, tasks already in the
datasets cache run with HF_DATASETS_OFFLINE=1, and `--include_path` adds task YAMLs over local files.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from avengers.progress import progress

log = logging.getLogger(__name__)

TELE11 = "arc_challenge,arc_easy,boolq,copa,hellaswag,openbookqa,piqa,sciq,winogrande,truthfulqa_mc2,social_iqa"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks
DATA_HINT = (
    "download it once where the Hub is reachable (the datasets cache, under HF_HOME, then serves it with "
    "HF_DATASETS_OFFLINE=1), or pass --include_path with a task YAML over local files"
)


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says why and what would work."""


def generation_room(max_length: int, max_gen_toks: int, task: str | None = None) -> int:
    """Prompt tokens that fit beside `max_gen_toks` new ones in max_length (EvalError if none)."""
    room = max_length - max_gen_toks
    if room < 1:
        raise EvalError(
            f"task {task or '?'} generates up to max_gen_toks={max_gen_toks} tokens, which leaves no room "
            f"for its prompt in max_length={max_length}; pass --gen_kwargs max_gen_toks=N with "
            f"N < {max_length}, or a larger --max_length"
        )
    return room


class AvengersLM(LM):
    """lm-eval model adapter over a model that follows the registry contract plus an HF tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_length: int,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        add_bos: int | None = None,
        model_info: dict | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.add_bos = add_bos
        self.model_info = model_info or {}

    def get_model_info(self) -> dict:
        """Merged into lm-eval's results["config"]."""
        params = sum(p.numel() for p in self.model.parameters())
        dtype = str(next(self.model.parameters()).dtype)
        return {"model_num_parameters": params, "model_dtype": dtype, "max_length": self.max_length, **self.model_info}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prefix(self) -> list[int]:
        if self.add_bos is not None:
            return [self.add_bos]
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], bar=None) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            seqs = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in batch]
            width = max(len(s) for s in seqs) - 1
            inputs = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                inputs[i, : len(s) - 1] = torch.tensor(s[:-1])  # right padding: causal, so harmless
            logprobs = F.log_softmax(self.model(inputs.to(self._device)).float(), dim=-1).cpu()
            for i, ((_, cont), s) in enumerate(zip(batch, seqs)):
                n = len(cont)
                pos = torch.arange(len(s) - 1 - n, len(s) - 1)
                target = torch.tensor(s[-n:])
                lp = logprobs[i, pos]
                results.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
            if bar is not None:
                bar.update(len(batch))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Also multiple choice: lm-eval asks one loglikelihood per (question, choice)."""
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) if context else self._prefix()
            pairs.append((ctx, self._encode(continuation)))
        bar = progress(total=len(pairs), desc="loglikelihood", unit="req")
        try:
            return self._score(pairs, bar)
        finally:
            bar.close()

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """Split a document into (context, continuation) windows scoring every token after the first
        exactly once, each with as much preceding context as fits in max_length."""
        windows = []
        for start in range(1, len(tokens), self.max_length):
            stop = min(start + self.max_length, len(tokens))
            ctx_start = max(0, stop - 1 - self.max_length)
            windows.append((tokens[ctx_start:start], tokens[start:stop]))
        return windows

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in progress(requests, desc="loglikelihood_rolling", unit="doc"):
            tokens = self._prefix() + self._encode(req.args[0])
            out.append(sum(lp for lp, _ in self._score(self.rolling_windows(tokens))))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy or sampled continuations; the prompt keeps its last tokens that fit beside max_gen_toks."""
        from avengers.inference.generate import generate

        for req in requests:  # refuse before generating anything
            max_new = int(req.args[1].get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            generation_room(self.max_length, max_new, getattr(req, "task_name", None))
        out = []
        for req in progress(requests, desc="generate_until", unit="req"):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = self._encode(context)[-generation_room(self.max_length, max_new) :] or self._prefix()
            prompt = torch.tensor([ids], device=self._device)
            new = generate(
                self.model,
                prompt,
                max_new_tokens=max_new,
                temperature=float(gen_kwargs.get("temperature", 0.0)),
                eos_token_id=self.tokenizer.eos_token_id,
            )[0, len(ids) :]
            text = self.tokenizer.decode(new.tolist(), skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def task_names(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """'a,b' / ['a', 'b'] / 'tele11' -> task names."""
    parts = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for p in parts for n in (TELE11.split(",") if p.strip() == "tele11" else [p])]
    names = [n for n in names if n]
    if not names:
        raise EvalError(f"--tasks {tasks!r} names no task")
    return names


def _leaf_tasks(loaded) -> list:
    from lm_eval.api.task import Task

    if isinstance(loaded, Task):
        return [loaded]
    if isinstance(loaded, dict):
        return [t for v in loaded.values() for t in _leaf_tasks(v)]
    return []


@functools.lru_cache(maxsize=4)
def task_index(include_path: str | None = None):
    """lm-eval's TaskManager: an index of every task YAML (seconds to build), kept for later
    evaluations in this process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def load_tasks(names: list[str], index) -> list:
    """Build every task (which downloads its data) before any model work: unknown names and data that
    cannot be reached become one-line EvalErrors. Returns the leaf Task objects."""
    from lm_eval.tasks import get_task_dict

    unknown = [n for n in names if n not in index.all_tasks and not os.path.isfile(n)]
    if unknown:
        close = {n: difflib.get_close_matches(n, index.all_tasks, n=3) for n in unknown}
        hints = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(c)}?)" if c else "") for n, c in close.items())
        raise EvalError(f"unknown task {hints}; `lm_eval ls tasks` lists them, --include_path adds YAML folders")
    load = getattr(index, "load", None)  # newer lm-eval; get_task_dict (deprecated there) before
    leaves = []
    for name in names:
        try:
            leaves += _leaf_tasks(load([name])["tasks"] if load else get_task_dict([name], index))
        except Exception as e:  # noqa: BLE001 - datasets/hub/network raise many types; all mean "not loadable"
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise EvalError(
                f"task {name!r}: its data could not be loaded ({type(e).__name__}: {first_line}); {DATA_HINT}"
            ) from e
    return leaves


def check_generation_lengths(tasks: list, max_length: int, gen_kwargs: dict | None) -> None:
    for task in tasks:
        if task.config.output_type == "generate_until":
            kwargs = {**(task.config.generation_kwargs or {}), **(gen_kwargs or {})}
            generation_room(max_length, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), task.config.task)


def results_path(output_dir: str) -> str:
    """A new results_<UTC time>.json in output_dir (a suffix when two runs share the second)."""
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, time.strftime("results_%Y-%m-%dT%H-%M-%S", time.gmtime()))
    path, n = stem + ".json", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}_{n}.json"
    return path


def _versions() -> dict:
    from importlib.metadata import version

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": version("lm_eval")}


def evaluate(
    ckpt: str,
    tasks: str | list[str] = "tele11",
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    device: str | None = None,
    tokenizer: str | None = None,
    include_path: str | None = None,
    output_dir: str | None = None,
    max_length: int | None = None,
    gen_kwargs: str | None = None,
) -> tuple[dict, str]:
    """Score a checkpoint with lm-eval; returns (lm-eval's results, path of the JSON written)."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, simple_parse_args_string
    from transformers import AutoTokenizer

    from avengers.config import make_config
    from avengers.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

    names = task_names(tasks)
    step_dir = resolve_checkpoint(ckpt)
    if step_dir is None:
        raise EvalError(f"--ckpt {ckpt}: no complete checkpoint (a run folder or a checkpoints/step_N_ckp folder)")
    cfg = make_config(os.path.join(step_dir, "config.yaml"))
    max_length = max_length or cfg.seq_length
    gen = simple_parse_args_string(gen_kwargs) if gen_kwargs else None
    index = task_index(include_path)
    check_generation_lengths(load_tasks(names, index), max_length, gen)

    tok = AutoTokenizer.from_pretrained(tokenizer or cfg.tokenizer_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model_from_checkpoint(step_dir, device=device)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    lm = AvengersLM(
        model,
        tok,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        add_bos=cfg.bos_token if cfg.bos_token is not None else cfg.eos_token,
        model_info={"model_variant": cfg.model_variant},
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        gen_kwargs=gen,
        log_samples=False,
        task_manager=index,
    )
    results["avengers"] = {
        "ckpt": ckpt,
        "checkpoint": os.path.abspath(step_dir),
        "model_variant": cfg.model_variant,
        "tasks": names,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "max_length": max_length,
        "versions": _versions(),
    }
    path = results_path(output_dir or os.path.join(ckpt, "eval"))
    with open(path, "x") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    return results, path


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avengers.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder (its newest checkpoint) or a checkpoint step folder")
    p.add_argument("--tasks", default="tele11", help="comma-separated lm-eval tasks/groups, or tele11")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tokenizer", default=None, help="default: the run's tokenizer_path")
    p.add_argument("--include_path", default=None, help="folder of extra task YAMLs (e.g. over local files)")
    p.add_argument("--output_dir", default=None, help="where results_<time>.json goes (default: <ckpt>/eval)")
    p.add_argument("--max_length", type=int, default=None, help="context window (default: the run's seq_length)")
    p.add_argument("--gen_kwargs", default=None, help="generation overrides, e.g. max_gen_toks=64,temperature=0")
    return p


def main(argv: list[str] | None = None) -> int:
    from lm_eval.utils import make_table

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        results, path = evaluate(**vars(args))
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    log.info("results: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
