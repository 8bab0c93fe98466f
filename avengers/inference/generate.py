"""Sampling and batched generation over any registry model (prefill, then one token per step)."""

from __future__ import annotations

import torch
from torch import nn

from avengers.decode.options import DecodeOptions
from avengers.inference.graphs import DecodeStep


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be None, 0 (no top-k filter) or >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]. Greedy when temperature == 0."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before > top_p  # the most likely token always has mass_before 0: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    cache_dtype: torch.dtype | None = None,
    options: DecodeOptions | None = None,
) -> torch.Tensor:
    """Continue every row of input_ids [B, T] by up to max_new_tokens tokens; returns [B, T + n].

    All rows share one position (equal-length prompts). There is no attention mask, so a
    right-padded prompt would be continued after its padding: pad-free, equal-length prompts only
    (generate prompts of different lengths in separate calls). Generation stops early once every
    row has produced eos_token_id; a finished row is filled with eos_token_id from then on.
    `options` picks the decode path (default: auto); `cuda_graph` None replays the decode step
    from a CUDA graph on CUDA devices.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a [batch, T>=1] long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens == 0:
        return input_ids.clone()
    B, T = input_ids.shape
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        cache = model.allocate_cache(
            B, T + max_new_tokens, device, cache_dtype or next(model.parameters()).dtype, options
        )
        logits = model(input_ids, cache=cache)[:, -1]
        use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        step = DecodeStep(model, cache, cuda_graph=use_graph) if max_new_tokens > 1 else None
        out = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            logits = step(nxt[:, None])
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
