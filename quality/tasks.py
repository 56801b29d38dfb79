"""Evaluation inputs: a JSONL task file (``{"prompt", "answer"}`` per line) or a text file, and
the exact-match rule an answer is judged by."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from edgelora.errors import ConfigError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str | None  # None: a text line, scored for perplexity only


@dataclass(frozen=True)
class EvalSet:
    path: Path
    kind: str  # "task" (JSONL) or "text"
    examples: tuple[Example, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def read_eval_file(path: str | Path, limit: int | None = None) -> EvalSet:
    """A ``.jsonl`` file of ``{"prompt": str, "answer": str}`` objects, or any other file as
    text (one non-empty line a sequence). :class:`ConfigError` naming the file and line for a
    line that is not such an object, or for a file with nothing to score."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: evaluation file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    examples = []
    kind = "task" if path.suffix == ".jsonl" else "text"
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if kind == "text":
            examples.append(Example(line, None))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise ConfigError(
                f'{path}:{n}: expected {{"prompt": str, "answer": str}}, got {line[:80]!r}'
            )
        if not row["prompt"]:
            raise ConfigError(f"{path}:{n}: empty prompt")
        examples.append(Example(row["prompt"], row["answer"]))
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ConfigError(f"{path}: nothing to evaluate (no non-empty lines)")
    return EvalSet(path, kind, tuple(examples))


def cut_answer(text: str) -> str:
    """The answer in a greedy continuation: up to the first newline, stripped (generation stops
    at EOS before this sees it)."""
    return text.split("\n", 1)[0].strip()


def is_correct(continuation: str, answer: str) -> bool:
    return cut_answer(continuation) == answer.strip()


def as_chat(eval_set: EvalSet, template) -> EvalSet:
    """``eval_set`` with each task prompt a user message rendered by ``template`` (a
    :class:`~edgelora.format.chat_template.ChatTemplate`), the assistant's turn opened: the
    answer is the assistant's reply. Text lines stay as they are."""
    examples = tuple(
        ex
        if ex.answer is None
        else Example(template.render([{"role": "user", "content": ex.prompt}]), ex.answer)
        for ex in eval_set.examples
    )
    return replace(eval_set, examples=examples)
