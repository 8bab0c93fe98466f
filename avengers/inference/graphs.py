"""One decode step (a token per sequence through model(..., cache=)), eager or replayed from a CUDA graph."""

from __future__ import annotations

import torch
from torch import nn

from avengers.decode.cache import InferenceCache, state_tensors


class DecodeStep:
    """`step(tokens[B, 1]) -> logits[B, V]`, advancing `cache` by one position.

    With `cuda_graph=True` the forward is captured once (after two warm-up calls on a side stream)
    and every step copies the tokens into a static input and replays the graph. The model must
    read the decode position from `cache.position` (a device tensor), not from `cache.seq_len`;
    the benchmark's correctness check replays the graph against eager decoding to catch models
    that do not, and with `preserve_state` the capture itself checks two replayed steps against
    eager ones (and raises). Warm-up, capture and that check run the model on the live cache, so
    with `preserve_state` the state tensors are saved before and restored after (set it False when
    memory is tight and the state content does not matter, as in timing runs).
    """

    def __init__(self, model: nn.Module, cache: InferenceCache, cuda_graph: bool = False, preserve_state: bool = True):
        self.model, self.cache = model, cache
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            if cache.position.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA cache, got one on {cache.position.device}")
            self._capture(preserve_state)

    @torch.no_grad()
    def _capture(self, preserve_state: bool) -> None:
        cache = self.cache
        start = cache.seq_len
        if start + 1 > cache.max_seq_len:
            raise ValueError(f"no room to capture a decode step: cache is full at {start} tokens")
        saved = [t.clone() for t in state_tensors(cache)] if preserve_state else None
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.position.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(self.tokens, cache=cache)
                cache.set_seq_len(start)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model(self.tokens, cache=cache)
        cache.set_seq_len(start)
        if saved is not None:
            self._restore(saved, start)
            self._verify(saved, start)

    def _restore(self, saved: list[torch.Tensor], start: int) -> None:
        for t, s in zip(state_tensors(self.cache), saved):
            t.copy_(s)
        self.cache.set_seq_len(start)

    def _verify(self, saved: list[torch.Tensor], start: int, steps: int = 2) -> None:
        """Replay vs eager for `steps` positions from the saved state: a model whose decode reads its
        position from a Python int replays the captured position and is caught here."""
        steps = min(steps, self.cache.max_seq_len - start)
        tokens = torch.zeros_like(self.tokens)
        eager = [self.model(tokens, cache=self.cache)[:, -1].float() for _ in range(steps)]
        self._restore(saved, start)
        for i in range(steps):
            self.tokens.copy_(tokens)
            self.graph.replay()
            err = float((self.logits[:, -1].float() - eager[i]).abs().max() / eager[i].abs().max().clamp_min(1e-12))
            if not err <= 2e-2:
                raise ValueError(
                    f"{type(self.model).__name__}'s decode step cannot be replayed from a CUDA graph "
                    f"(relative error {err:.3g} at step {i}); use cuda_graph=False"
                )
        self._restore(saved, start)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if self.graph is None:
            return self.model(tokens, cache=cache)[:, -1]
        if cache.seq_len + 1 > cache.max_seq_len:
            raise ValueError(f"cache holds max_seq_len={cache.max_seq_len} tokens and is full")
        self.tokens.copy_(tokens)
        self.graph.replay()
        cache.seq_len += 1  # the graph advanced cache.position on the device
        return self.logits[:, -1]
