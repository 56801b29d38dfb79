"""The evaluation's numbers on cases with a known answer: a scorer whose logits are chosen here,
so accuracy, perplexity and agreement can be computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgelora.errors import ConfigError
from edgelora.quality.scoring import agreement, encode_set, greedy_loop, score_set
from edgelora.quality.tasks import read_eval_file
from edgelora.runtime.tokenizer import write_char_tokenizer

VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer

    path = write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", VOCAB)
    return Tokenizer.from_file(str(path))


class ScriptedScorer:
    """Puts logit ``high`` on the token ``script(ids_so_far)`` and 0 elsewhere."""

    max_seq_len = 256

    def __init__(self, script, high: float, label: str = "scripted") -> None:
        self.script, self.high, self.label = script, high, label

    def logits(self, ids):
        out = torch.zeros(len(ids), VOCAB)
        for i in range(len(ids)):
            out[i, self.script(ids[: i + 1])] = self.high
        return out

    def greedy(self, prompt, max_new_tokens, stop):
        def step(tokens, start):
            self.seq = list(prompt) if start == 0 else self.seq + tokens
            return self.logits(self.seq)[-1:]

        return greedy_loop(step, prompt, max_new_tokens, stop)


def _task_file(tmp_path, rows):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_eval_file(path)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(tokenizer, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox\n\njumps over\n")
    s = read_eval_file(path)
    enc = encode_set(s, tokenizer)
    r = score_set(ScriptedScorer(lambda ids: 0, 0.0), s, enc, tokenizer, [2])
    assert r.kind == "text" and r.accuracy is None
    assert r.tokens == sum(len(e.ids) - 1 for e in enc) == len("the quick brown fox") - 1 + 9
    # uniform logits: every token has probability 1/VOCAB (exact up to float rounding)
    assert r.perplexity == pytest.approx(VOCAB, rel=1e-6)


def test_accuracy_and_perplexity_of_a_model_that_knows_the_answers(tokenizer, tmp_path):
    rows = [{"prompt": "the fox", "answer": "jumps"}, {"prompt": "a dog", "answer": "naps"}]
    s = _task_file(tmp_path, rows)
    enc = encode_set(s, tokenizer)
    answers = {tuple(e.prompt): e.ids[e.start :] for e in enc}
    newline = tokenizer.encode("\n").ids[0]

    def oracle(ids):  # continue the answer of the prompt that ``ids`` starts with, then "\n"
        for prompt, answer in answers.items():
            if tuple(ids[: len(prompt)]) == prompt:
                k = len(ids) - len(prompt)
                return answer[k] if 0 <= k < len(answer) else newline
        return 0

    high = 5.0
    r = score_set(ScriptedScorer(oracle, high), s, enc, tokenizer, [2])
    assert r.correct == 2 and r.accuracy == 1.0 and r.answers == ["jumps", "naps"]
    # each scored token has probability e^h / (e^h + VOCAB - 1)
    p = math.exp(high) / (math.exp(high) + VOCAB - 1)
    assert r.perplexity == pytest.approx(1 / p, rel=1e-5)
    assert r.tokens == sum(len(a) for a in answers.values())

    # a model that answers the first prompt only: 50%, and agreement counts the differences
    def half(ids):
        return oracle(ids) if tuple(ids[:2]) == tuple(enc[0].prompt[:2]) else 3

    w = score_set(ScriptedScorer(half, high, "half"), s, enc, tokenizer, [2])
    assert w.correct == 1 and w.accuracy == 0.5
    ag = agreement(r, w)
    assert ag["answer_agreement"] == 0.5
    assert ag["token_agreement"] == pytest.approx(len(answers[tuple(enc[0].prompt)]) / r.tokens)
    assert agreement(r, r) == {"token_agreement": 1.0, "answer_agreement": 1.0}


def test_generation_stops_at_eos_and_the_answer_is_cut_at_a_newline(tokenizer, tmp_path):
    s = _task_file(tmp_path, [{"prompt": "ab", "answer": "c"}])
    enc = encode_set(s, tokenizer)
    c, nl = tokenizer.encode("c").ids[0], tokenizer.encode("\n").ids[0]
    seen = []

    def script(ids):
        seen.append(len(ids))
        return c if len(ids) == 2 else nl

    r = score_set(ScriptedScorer(script, 9.0), s, enc, tokenizer, [2], max_new_tokens=30)
    assert r.answers == ["c"] and r.correct == 1
    # an EOS id ends generation too, and is not part of the answer
    r = score_set(
        ScriptedScorer(lambda ids: c if len(ids) == 2 else 2, 9.0), s, enc, tokenizer, [2]
    )
    assert r.answers == ["c"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "task.jsonl:2: not JSON"),
        ('{"prompt": "x"}', 'task.jsonl:2: expected {"prompt": str, "answer": str}'),
        ('{"prompt": "", "answer": "y"}', "task.jsonl:2: empty prompt"),
        ('["prompt", "answer"]', "task.jsonl:2: expected"),
    ],
)
def test_bad_task_lines_are_refused_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        read_eval_file(path)


def test_empty_or_missing_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_eval_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        read_eval_file(tmp_path / "empty.txt")
