"""The shipped trained model and adapters (``examples/tiny``): they do their tasks in
transformers + peft, the fp32 export does the same on the ExecuTorch runtime, and the default
quantization recipe keeps it. A retrain that breaks any of this fails here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from edgelora.format.manifest import read_export
from edgelora.quality.reference import ReferenceScorer
from edgelora.quality.runtime import open_runtime
from edgelora.quality.scoring import agreement, encode_set, score_set
from edgelora.quality.tasks import read_eval_file

TASKS = ("reverse", "opposite")


@pytest.fixture(scope="module")
def tok(trained_tiny):
    return Tokenizer.from_file(str(trained_tiny / "model" / "tokenizer.json"))


@pytest.fixture(scope="module")
def eos(trained_tiny):
    import json

    return [json.loads((trained_tiny / "model" / "config.json").read_text())["eos_token_id"]]


@pytest.fixture(scope="module")
def eager(trained_tiny, tok, eos):
    """Reference results (transformers + peft) of every (program, task file) pair used below."""
    results = {}
    for task in TASKS:
        s = read_eval_file(trained_tiny / "eval" / f"{task}.jsonl")
        enc = encode_set(s, tok)
        for program in ("base", task):
            lora = None if program == "base" else trained_tiny / "adapters" / program
            scorer = ReferenceScorer(trained_tiny / "model", lora)
            results[program, task] = score_set(scorer, s, enc, tok, eos)
    return results


@pytest.mark.parametrize("task", TASKS)
def test_adapters_do_their_task_in_transformers_and_the_base_does_not(eager, task):
    with_adapter, without = eager[task, task], eager["base", task]
    assert with_adapter.examples == without.examples == 200
    assert with_adapter.accuracy >= 0.90, with_adapter.answers[:10]
    assert without.accuracy <= 0.20, without.answers[:10]


def _runtime(export_dir, program, trained_tiny, tok, eos, task):
    s = read_eval_file(trained_tiny / "eval" / f"{task}.jsonl")
    scorer = open_runtime(export_dir, adapter=None if program == "base" else program)
    return score_set(scorer, s, encode_set(s, tok), tok, eos)


@pytest.mark.parametrize(
    "program, task", [("base", "reverse"), ("reverse", "reverse"), ("opposite", "opposite")]
)
def test_fp32_export_matches_transformers_on_the_runtime(
    export_trained_fp32, eager, trained_tiny, tok, eos, program, task
):
    """Known answer for the evaluation too: the fp32 program is the eager model, so accuracy is
    equal and perplexity equal within 1e-4 relative (fp32 kernels reorder sums: logits differ by
    ~1e-5, far below that)."""
    assert read_export(export_trained_fp32).eos_ids == eos
    rt = _runtime(export_trained_fp32, program, trained_tiny, tok, eos, task)
    ref = eager[program, task]
    ag = agreement(rt, ref)
    assert ag["token_agreement"] >= 0.99, ag
    assert rt.accuracy == ref.accuracy
    assert rt.perplexity == pytest.approx(ref.perplexity, rel=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_default_recipe_keeps_task_accuracy(
    export_trained_fp32, export_trained_default, trained_tiny, tok, eos, task
):
    """The default quantization loses at most 2 points of task accuracy against fp32, both
    measured on the runtime (200 prompts: one point is two answers)."""
    fp32 = _runtime(export_trained_fp32, task, trained_tiny, tok, eos, task)
    quant = _runtime(export_trained_default, task, trained_tiny, tok, eos, task)
    assert read_export(export_trained_default).quantization.qmode == "8da4w"
    assert quant.accuracy >= fp32.accuracy - 0.02, (fp32.accuracy, quant.accuracy)
