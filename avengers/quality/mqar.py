"""Multi-query associative recall (MQAR, the Zoology benchmark's task), generated on the fly.

One sequence of `seq_len` tokens holds `kv_pairs` key-value pairs up front, then every key once
more as a query somewhere in the rest; the target after a query is its value, every other label is
-100, so loss and accuracy count the value tokens only:

    inputs : k1 v1 k2 v2 k3 v3 | x  x  k2 x  x  x  k1 x  k3 x ...
    labels : -100 ...          | -  -  v2 -  -  -  v1 -  v3 - ...

Keys come from [1, vocab/2), values from [vocab/2, vocab); the keys of one sequence are distinct.
A query's slot (an even offset after the pairs) is drawn with probability proportional to
slot^(power_a - 1), so most queries come soon after the pairs and a few far away (power_a = 1 is
uniform). Non-query positions hold random tokens of the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class MQARTask:
    seq_len: int
    kv_pairs: int
    vocab_size: int
    power_a: float = 0.01

    def __post_init__(self) -> None:
        if self.kv_pairs < 1:
            raise ValueError(f"kv_pairs={self.kv_pairs}: expected an integer >= 1")
        if 4 * self.kv_pairs > self.seq_len:
            raise ValueError(
                f"kv_pairs={self.kv_pairs} does not fit seq_len={self.seq_len}: the pairs and one query per key "
                f"need 4 * kv_pairs <= seq_len (use kv_pairs <= {self.seq_len // 4})"
            )
        if self.vocab_size < 2 * self.kv_pairs + 2:
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small for {self.kv_pairs} distinct keys; "
                f"use vocab_size >= {2 * self.kv_pairs + 2}"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a={self.power_a}: expected a number in (0, 1] (1 = uniform query slots)")


def mqar_batch(task: MQARTask, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), both LongTensor [batch_size, seq_len], drawn from `generator` on its device."""
    B, P, T, V = batch_size, task.kv_pairs, task.seq_len, task.vocab_size
    half, dev = V // 2, generator.device
    keys = torch.rand(B, half - 1, generator=generator, device=dev).topk(P, dim=1).indices + 1  # distinct per row
    values = torch.randint(half, V, (B, P), generator=generator, device=dev)
    inputs = torch.randint(0, V, (B, T), generator=generator, device=dev)
    labels = torch.full((B, T), IGNORE, dtype=torch.long, device=dev)
    inputs[:, 0 : 2 * P : 2] = keys
    inputs[:, 1 : 2 * P : 2] = values
    slots = (T - 2 * P) // 2
    weight = torch.arange(1, slots + 1, dtype=torch.float64, device=dev) ** (task.power_a - 1)
    slot = torch.multinomial(weight.expand(B, slots), P, replacement=False, generator=generator)
    pos = 2 * P + 2 * slot
    inputs.scatter_(1, pos, keys)
    labels.scatter_(1, pos, values)
    return inputs, labels


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, scored): greedy predictions that equal the value, over the value positions only."""
    scored = labels != IGNORE
    correct = (logits.argmax(dim=-1) == labels) & scored
    return int(correct.sum()), int(scored.sum())
