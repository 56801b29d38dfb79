"""Which quantization recipe keeps what the trained tiny model learned: task accuracy,
perplexity, file sizes and decode speed of each recipe, measured on the ExecuTorch runtime.

    python bench/recipes.py [--work DIR] [--json bench/results/recipes-tiny.json]
                            [--only NAME,...] [--limit N] [--rounds 3]

Exports ``examples/tiny/model`` with both shipped adapters (``reverse``, ``opposite``) once per
recipe (each export in its own process), then scores every program with
:mod:`edgelora.quality` on the held-out files in ``examples/tiny/eval``: base perplexity on
``text.txt``, each adapter's exact-match accuracy and answer perplexity on its task file.
Decode ms/token is the median step of a 48-token greedy generation, taken in ``--rounds``
rounds that alternate over the recipes in one process (this VM's speed drifts by up to 30%
between processes, so only figures from the same run are compared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"
ADAPTERS = ("reverse", "opposite")
_E8 = ["--embedding-bits", "8", "--embedding-group-size", "32"]
_E4 = ["--embedding-bits", "4", "--embedding-group-size", "32"]
_O8 = ["--output-bits", "8"]
RECIPES: dict[str, list[str]] = {
    "fp32": ["--qmode", "none"],
    "8da4w g32": ["--qmode", "8da4w", "--group-size", "32"],
    "8da4w g32 hqq": ["--qmode", "8da4w", "--group-size", "32", "--qparams", "hqq"],
    "8da4w g64": ["--qmode", "8da4w", "--group-size", "64"],
    "8da4w g128": ["--qmode", "8da4w", "--group-size", "128"],
    "8da4w g32 emb8": ["--qmode", "8da4w", "--group-size", "32", *_E8],
    "8da4w g32 emb4": ["--qmode", "8da4w", "--group-size", "32", *_E4],
    "8da4w g32 out8": ["--qmode", "8da4w", "--group-size", "32", *_O8],
    "8da4w g32 hqq emb8": ["--qmode", "8da4w", "--group-size", "32", "--qparams", "hqq", *_E8],
    "8da4w g32 hqq emb8 out8": ["--qmode", "8da4w", "--qparams", "hqq", *_E8, *_O8],
    "8da4w g128 hqq emb8 out8": [
        "--qmode",
        "8da4w",
        "--group-size",
        "128",
        "--qparams",
        "hqq",
        *_E8,
        *_O8,
    ],  # fmt: skip
    "8da8w": ["--qmode", "8da8w", "--group-size", "0"],
}


def export(name: str, flags: list[str], out: Path) -> float:
    argv = [sys.executable, "-m", "edgelora.export.cli", "--checkpoint", str(TINY / "model")]
    argv += [f"--lora={a}={TINY / 'adapters' / a}" for a in ADAPTERS]
    argv += [*flags, "--output-dir", str(out), "--overwrite"]
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"export {name!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def score(out: Path, limit: int | None) -> dict:
    from tokenizers import Tokenizer

    from edgelora.format.manifest import read_export
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.scoring import encode_set, score_set
    from edgelora.quality.tasks import read_eval_file

    manifest = read_export(out)
    tok = Tokenizer.from_file(str(out / manifest.tokenizer))
    text = read_eval_file(TINY / "eval" / "text.txt", limit)
    base = score_set(
        open_runtime(out), text, encode_set(text, tok), tok, manifest.eos_ids
    )  # fmt: skip
    result = {"base_text_perplexity": base.perplexity, "tasks": {}}
    for task in ADAPTERS:
        s = read_eval_file(TINY / "eval" / f"{task}.jsonl", limit)
        r = score_set(open_runtime(out, adapter=task), s, encode_set(s, tok), tok, manifest.eos_ids)
        result["tasks"][task] = {"accuracy": r.accuracy, "perplexity": r.perplexity}
    files = {n: e.size for n, e in manifest.files.items()}
    result["foundation_bytes"] = files["foundation.ptd"]
    result["adapter_bytes"] = {a: files[f"{a}.pte"] for a in ADAPTERS}
    return result


def decode_ms(outs: dict[str, Path], rounds: int) -> dict[str, float]:
    from edgelora.runtime.program import LlamaProgram

    programs = {n: LlamaProgram(o / "reverse.pte", o / "foundation.ptd") for n, o in outs.items()}
    prompt = list(range(3, 19))
    samples: dict[str, list[float]] = {n: [] for n in outs}
    for _ in range(rounds):
        for name, program in programs.items():
            samples[name].append(program.generate(prompt, 48).decode_ms_per_token)
    return {n: statistics.median(v) for n, v in samples.items()}


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| recipe | reverse acc | opposite acc | base ppl (text) | reverse ppl | opposite ppl "
        "| foundation.ptd KiB | adapter .pte KiB | decode ms/token (reverse.pte) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        t = r["tasks"]
        lines.append(
            f"| {name} | {100 * t['reverse']['accuracy']:.1f}% | "
            f"{100 * t['opposite']['accuracy']:.1f}% | {r['base_text_perplexity']:.3f} | "
            f"{t['reverse']['perplexity']:.4f} | {t['opposite']['perplexity']:.4f} | "
            f"{r['foundation_bytes'] / 1024:.0f} | {r['adapter_bytes']['reverse'] / 1024:.0f} | "
            f"{r['decode_ms']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", default=None, help="comma-separated recipe names")
    p.add_argument("--limit", type=int, default=None, help="score the first N lines of each file")
    p.add_argument("--rounds", type=int, default=3)
    ns = p.parse_args()
    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-recipes-"))
    names = ns.only.split(",") if ns.only else list(RECIPES)
    rows, outs = {}, {}
    for name in names:
        out = work / name.replace(" ", "_")
        seconds = export(name, RECIPES[name], out)
        rows[name] = {"flags": RECIPES[name], "export_s": round(seconds, 1), **score(out, ns.limit)}
        outs[name] = out
        t = rows[name]["tasks"]
        print(
            f"{name}: reverse {t['reverse']['accuracy']:.3f}, opposite "
            f"{t['opposite']['accuracy']:.3f}, base ppl {rows[name]['base_text_perplexity']:.3f} "
            f"(export {seconds:.0f} s)",
            flush=True,
        )
    for name, ms in decode_ms(outs, ns.rounds).items():
        rows[name]["decode_ms"] = ms
    print(table(rows))
    if ns.json:
        ns.json.write_text(json.dumps({"limit": ns.limit, "recipes": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
