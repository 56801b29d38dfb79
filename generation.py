"""Greedy generation with a KV cache: the one loop both the runtime and the eager reference run."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    """Result of :func:`greedy_generate`."""

    prompt: list[int]
    tokens: list[int]  # generated ids (greedy), not including the prompt
    prompt_logits: torch.Tensor  # [len(prompt), vocab] float32 (or [1, vocab]: last only)
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_ms_per_token(self) -> float:
        if not self.decode_s:
            return float("nan")
        steps = sorted(self.decode_s)
        return 1e3 * steps[len(steps) // 2]  # median: robust to a noisy step


def greedy_generate(
    forward: Callable[[list[int], int], torch.Tensor],
    prompt: list[int],
    max_new_tokens: int,
    stop: Collection[int] = (),
) -> Generation:
    """Prefill ``prompt`` in one call, then decode up to ``max_new_tokens`` greedily; a token of
    ``stop`` (the EOS ids) ends it, and is the last of ``tokens``.

    ``forward(tokens, start)`` returns logits ``[len(tokens) or 1, vocab]`` for ``tokens`` placed
    at positions ``start...`` and advances the caller's KV cache."""
    t0 = time.perf_counter()
    logits = forward(list(prompt), 0)
    gen = Generation(list(prompt), [], logits.clone(), time.perf_counter() - t0)
    next_tok = int(logits[-1].argmax())
    for i in range(max_new_tokens):
        gen.tokens.append(next_tok)
        if i == max_new_tokens - 1 or next_tok in stop:
            break
        t0 = time.perf_counter()
        step = forward([next_tok], len(prompt) + i)
        gen.decode_s.append(time.perf_counter() - t0)
        next_tok = int(step[-1].argmax())
    return gen
