"""Exact-match accuracy, perplexity per token and greedy-token agreement, for any model that can
give logits for a token sequence and continue a prompt greedily (:class:`Scorer`): a program on
the ExecuTorch runtime (:mod:`edgelora.quality.runtime`) or the eager transformers (+ peft) model
(:mod:`edgelora.quality.reference`).

What is scored, per example:

* a task line: the answer's tokens, ``encode(prompt + separator + answer)`` after the prompt's
  own tokens (teacher forced, for perplexity and agreement), and the greedy continuation of
  ``encode(prompt)`` cut at the first newline or EOS (for exact match);
* a text line: every token after the first (the first has nothing to be predicted from: no BOS
  is added).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgelora.errors import ConfigError
from edgelora.quality.tasks import EvalSet, cut_answer


class Scorer(Protocol):
    label: str
    max_seq_len: int

    def logits(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` float32 logits of ``ids`` placed at positions ``0...``."""

    def greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[int], bool]
    ) -> list[int]:
        """Greedy continuation of ``prompt`` (from position 0), at most ``max_new_tokens`` ids,
        ending with (and including) the first id for which ``stop`` is true."""


@dataclass
class Encoded:
    ids: list[int]  # the whole teacher-forced sequence
    start: int  # ids[start:] are scored, each from the logits one position before
    prompt: list[int] | None  # task lines: the prompt's ids, to continue greedily
    answer: str | None


@dataclass
class SetResult:
    """One model on one evaluation file."""

    label: str
    eval_set: str
    kind: str
    examples: int
    tokens: int  # scored tokens
    nll: float  # summed negative log-likelihood (nats)
    correct: int | None = None
    answers: list[str] = field(default_factory=list)  # cut greedy answers (task files)
    argmax: list[list[int]] = field(default_factory=list)  # per example, at scored positions

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.examples

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "eval_set": self.eval_set,
            "kind": self.kind,
            "examples": self.examples,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "perplexity": self.perplexity,
            "scored_tokens": self.tokens,
        }


def encode_set(eval_set: EvalSet, tokenizer, separator: str = " ") -> list[Encoded]:
    """Token ids of every example (``tokenizer``: a ``tokenizers.Tokenizer``; encoded as it is,
    with no special tokens added beyond what its post-processor adds)."""
    out = []
    for ex in eval_set.examples:
        if ex.answer is None:
            ids = tokenizer.encode(ex.prompt).ids
            if len(ids) >= 2:
                out.append(Encoded(ids, 1, None, None))
            continue
        prompt = tokenizer.encode(ex.prompt).ids
        full = tokenizer.encode(ex.prompt + separator + ex.answer).ids
        if full[: len(prompt)] != prompt:  # the tokenizer merged across the boundary
            full = prompt + tokenizer.encode(separator + ex.answer).ids
        out.append(Encoded(full, len(prompt), prompt, ex.answer))
    if not out:
        raise ConfigError(f"{eval_set.path}: no line has two or more tokens to score")
    return out


def score_set(
    scorer: Scorer,
    eval_set: EvalSet,
    encoded: list[Encoded],
    tokenizer,
    eos_ids: list[int],
    *,
    max_new_tokens: int = 32,
    progress: Callable | None = None,
) -> SetResult:
    """Score ``scorer`` on ``encoded`` (from :func:`encode_set`); ``progress(iterable)`` wraps
    the loop (a progress bar)."""
    newline_ids = {i for i in range(tokenizer.get_vocab_size()) if "\n" in tokenizer.decode([i])}
    stops = set(eos_ids) | newline_ids
    result = SetResult(scorer.label, eval_set.name, eval_set.kind, len(encoded), 0, 0.0)
    if eval_set.kind == "task":
        result.correct = 0
    for enc in progress(encoded) if progress else encoded:
        if len(enc.ids) > scorer.max_seq_len:
            raise ConfigError(
                f"{eval_set.path}: an example of {len(enc.ids)} tokens exceeds the model's "
                f"max_seq_len {scorer.max_seq_len}"
            )
        logits = scorer.logits(enc.ids).float()
        pred = logits[enc.start - 1 : len(enc.ids) - 1]
        target = torch.tensor(enc.ids[enc.start :])
        result.nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
        result.tokens += len(target)
        result.argmax.append(pred.argmax(-1).tolist())
        if enc.prompt is not None:
            room = min(max_new_tokens, scorer.max_seq_len - len(enc.prompt))
            new = scorer.greedy(enc.prompt, room, lambda t: t in stops)
            text = tokenizer.decode([t for t in new if t not in eos_ids])
            answer = cut_answer(text)
            result.answers.append(answer)
            result.correct += answer == enc.answer.strip()
    return result


def agreement(a: SetResult, b: SetResult) -> dict[str, float]:
    """Greedy-token agreement of two models on the same sequences: the share of scored
    positions where their argmax tokens are equal (teacher forced, so one early difference
    does not count for every later token), and for task files the share of equal answers."""
    pairs = [
        (x, y)
        for xs, ys in zip(a.argmax, b.argmax, strict=True)
        for x, y in zip(xs, ys, strict=True)
    ]
    out = {"token_agreement": sum(x == y for x, y in pairs) / len(pairs)}
    if a.answers:
        same = sum(x == y for x, y in zip(a.answers, b.answers, strict=True))
        out["answer_agreement"] = same / len(a.answers)
    return out


def greedy_loop(
    step: Callable[[list[int], int], torch.Tensor],
    prompt: list[int],
    max_new_tokens: int,
    stop: Callable[[int], bool],
) -> list[int]:
    """Prefill ``prompt`` then decode one token at a time with ``step(tokens, start)`` (the
    last row of its logits is the next token's); stops after a ``stop`` token."""
    new: list[int] = []
    if max_new_tokens <= 0:
        return new
    logits = step(list(prompt), 0)
    while True:
        tok = int(logits[-1].argmax())
        new.append(tok)
        if stop(tok) or len(new) >= max_new_tokens:
            return new
        logits = step([tok], len(prompt) + len(new) - 1)
