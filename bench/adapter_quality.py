"""A trained adapter on a quantized real base: how much of its effect survives each recipe.

    python bench/adapter_quality.py [--work DIR] [--recipes q4_k_m,q8_0,q4_0] [--limit N]
                                    [--json bench/results/adapter-quality-smollm2-135m.json]

The adapter ``examples/smollm2/train.py`` trained on the float SmolLM2-135M-Instruct
(``isodate``: dates in words to ISO 8601, held-out prompts in ``examples/smollm2/eval``) is
exported with each recipe (``--lora isodate=...``), and its program ``isodate.pte`` is measured
on the ExecuTorch runtime against transformers + PEFT fp32 on the same ids:

* **task accuracy**: each held-out prompt is a user message in the model's chat template, the
  answer the greedy reply cut at ``<|im_end|>``, exact match (``edgelora-eval --chat``'s
  scoring, :mod:`edgelora.quality`);
* **KLD**: mean ``KL(P_ref || P_program)`` per position over the teacher-forced
  prompt + answer + ``<|im_end|>`` of every held-out example, over all positions and over the
  answer's positions alone (where the adapter's effect is); and top-1 agreement there;
* the same for ``base.pte`` against transformers without the adapter, for scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from edgelora.bench.common import export  # noqa: E402
from edgelora.realmodels import MODELS, cache_dir, hf_dir  # noqa: E402

ADAPTER = ROOT / "examples" / "smollm2" / "adapters" / "isodate"
EVAL = ROOT / "examples" / "smollm2" / "eval" / "isodate.jsonl"


def kld(ref: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    r, g = ref.double().log_softmax(-1), got.double().log_softmax(-1)
    return (r.exp() * (r - g)).sum(-1)


def measure(out: Path, hf: Path, limit: int | None) -> dict:
    from tokenizers import Tokenizer

    from edgelora.format.chat_template import ChatTemplate
    from edgelora.format.manifest import read_export
    from edgelora.quality.reference import ReferenceScorer
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.scoring import encode_set, score_set
    from edgelora.quality.tasks import as_chat, read_eval_file

    manifest = read_export(out)
    tok = Tokenizer.from_file(str(out / manifest.tokenizer))
    eval_set = as_chat(read_eval_file(EVAL, limit), ChatTemplate.of_dir(out))
    encoded = encode_set(eval_set, tok, "")
    end = tok.token_to_id("<|im_end|>")
    result = {}
    for name, lora in (("base", None), ("isodate", ADAPTER)):
        ref = ReferenceScorer(hf, lora)
        got = open_runtime(out, adapter=None if name == "base" else name)
        acc = {
            who: score_set(s, eval_set, encoded, tok, manifest.eos_ids, max_new_tokens=12).accuracy
            for who, s in (("reference", ref), ("runtime", got))
        }
        all_k, ans_k, agree, n_all, n_ans = 0.0, 0.0, 0, 0, 0
        for e in encoded:
            ids = e.ids + [end]
            r, g = ref.logits(ids)[:-1], got.program.forward(ids, 0).float()[:-1]
            k = kld(r, g)
            answer = slice(e.start - 1, len(ids) - 1)  # positions predicting the answer + end
            all_k += float(k.sum())
            ans_k += float(k[answer].sum())
            agree += int((r[answer].argmax(-1) == g[answer].argmax(-1)).sum())
            n_all += len(k)
            n_ans += len(k[answer])
        result[name] = {
            "accuracy_reference_fp32": acc["reference"],
            "accuracy_runtime": acc["runtime"],
            "mean_kld_all_positions": all_k / n_all,
            "mean_kld_answer_positions": ans_k / n_ans,
            "top1_agreement_answer_positions": agree / n_ans,
            "examples": len(encoded),
        }
        print(out.name, name, json.dumps(result[name]), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=cache_dir() / "smollm2-135m" / "speed")
    p.add_argument("--recipes", default="q4_k_m,q8_0,q4_0")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / "adapter-quality-smollm2-135m.json",
    )
    ns = p.parse_args()
    hf = hf_dir(MODELS["smollm2-135m"])
    rows = {}
    for recipe in ns.recipes.split(","):
        out = ns.work / f"{recipe}-isodate"
        if not (out / "manifest.json").is_file():
            flags = ["--recipe", recipe, "--lora", f"isodate={ADAPTER}"]
            export(flags + (["--switchable"] if recipe == "q4_k_m" else []), hf, out)
        rows[recipe] = measure(out, hf, ns.limit)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=2) + "\n")
    lines = [
        "| recipe | program | accuracy transformers+PEFT fp32 | accuracy runtime | KLD all | "
        "KLD answer | top-1 answer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for recipe, by in rows.items():
        for name, r in by.items():
            lines.append(
                f"| {recipe} | {name}.pte | {100 * r['accuracy_reference_fp32']:.1f}% | "
                f"{100 * r['accuracy_runtime']:.1f}% | {r['mean_kld_all_positions']:.4f} | "
                f"{r['mean_kld_answer_positions']:.4f} | "
                f"{100 * r['top1_agreement_answer_positions']:.1f}% |"
            )
    ns.json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
