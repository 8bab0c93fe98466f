"""lm-evaluation-harness on any registry model, from a training run or checkpoint folder.

    python -m avengers.evaluate --ckpt runs/llama3 --tasks arc_easy,hellaswag --batch_size 16

Every family (Llama, Mamba-2, hybrids, telescoping) is scored through the same `AvengersLM`
adapter, with one full forward per batch of requests, so scores are comparable across families.
The 11 zero-shot tasks of the original telescoping comparison are `--tasks tele11`.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm import tqdm

TELE11 = "arc_challenge,arc_easy,boolq,copa,hellaswag,openbookqa,piqa,sciq,winogrande,truthfulqa_mc2,social_iqa"


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
    ):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.add_bos = add_bos

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prefix(self) -> list[int]:
        if self.add_bos is not None:
            return [self.add_bos]
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
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
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) if context else self._prefix()
            pairs.append((ctx, self._encode(continuation)))
        return self._score(pairs)

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
        for req in tqdm(requests, desc="rolling loglikelihood", disable=len(requests) < 8):
            tokens = self._prefix() + self._encode(req.args[0])
            out.append(sum(lp for lp, _ in self._score(self.rolling_windows(tokens))))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        from avengers.inference.generate import generate

        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self._encode(context)[-(self.max_length - max_new) :] or self._prefix()
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


def evaluate(
    ckpt: str,
    tasks: str = TELE11,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | None = None,
    device: str | None = None,
    tokenizer: str | None = None,
    include_path: str | None = None,
    output: str | None = None,
) -> dict:
    """Score a checkpoint with lm-eval; writes `<ckpt>/eval/results.json` unless `output` is given."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from avengers.train.checkpoint import load_model_from_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task_list = TELE11.split(",") if tasks == "tele11" else [t for t in str(tasks).split(",") if t]
    model, cfg = load_model_from_checkpoint(ckpt, device=device)
    tok = AutoTokenizer.from_pretrained(tokenizer or cfg.tokenizer_path)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    lm = AvengersLM(
        model,
        tok,
        max_length=cfg.seq_length,
        batch_size=batch_size,
        device=device,
        add_bos=cfg.bos_token if cfg.bos_token is not None else cfg.eos_token,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_list,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include_path),
    )
    summary = {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for task, metrics in results["results"].items()
    }
    output = output or os.path.join(ckpt, "eval", "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"ckpt": ckpt, "model_variant": cfg.model_variant, "results": summary}, f, indent=2)
    for task, metrics in summary.items():
        print(task, {k: round(v, 4) for k, v in metrics.items()})
    return summary


if __name__ == "__main__":
    import fire

    fire.Fire(evaluate)
