"""Speed on a real model, side by side with llama.cpp: prefill and decode at 1 and 2 threads,
with and without a LoRA adapter, every candidate fed the same token ids.

    python bench/speed.py [--work DIR] [--rounds 3] [--threads 1,2]
                          [--json bench/results/speed-smollm2-135m.json]

* **Model**: SmolLM2-135M-Instruct (:mod:`edgelora.realmodels`), and the adapter
  ``examples/smollm2/train.py`` trained (``isodate``, rank 8 on all seven projections).
* **Ours**: the default recipe (``q4_k_m``) exported with the adapter and ``--switchable``:
  ``base.pte``, ``isodate.pte`` (the adapter lowered into its program) and ``switchable.pte``
  with the adapter's weights as inputs; ``isodate.pte`` with ``--adapter-dtype int8`` (int8
  adapter weights under fp32 activations); and the 8-bit preset (``q8_0``) ``base.pte`` (the
  exports ``bench/adapter_quality.py`` measures, shared through ``--work``).
* **llama.cpp** (``llama-cpp-python``, built as ``bench/quality.py`` says): Q4_0, Q4_K_M and
  Q8_0 of the model's own GGUF (``llama_model_quantize``), each also with the adapter as a GGUF
  LoRA (``--lora``), converted from the PEFT directory by llama.cpp's own
  ``convert_lora_to_gguf.py`` (from the ``llama-cpp-python`` sdist pip downloads, f16).
* **The app's form** (``--logits last``): the default recipe exported as a generating app
  ships it (and as ExecuTorch's example exports by default), the output layer run on the last
  prompt position only. llama.cpp computes the last position's logits only too
  (``llama-cpp-python``'s ``eval`` without ``logits_all``); the default export's ``--logits
  all`` runs the 49152-row output layer on all 128 prompt positions, which evaluation needs.
* **Measured**: prefill tokens/s of a 128-token prompt (median of 3) and decode ms/token (the
  median of 64 steps, each fed the next id of the same text: teacher-forced, so every
  candidate runs exactly the same positions). Each candidate runs in its own process, the
  candidates alternate within each round, ``--rounds`` rounds; a figure is the median over
  rounds. The threadpool size is set before the program is loaded (ours:
  ``_unsafe_reset_threadpool``; llama.cpp: ``n_threads``/``n_threads_batch``).
* **Adapter overhead** (``--paired``, written to ``...-overhead.json|md``): a base and its
  adapter form are loaded into **one** process and alternate step by step (each with its own
  KV cache; llama.cpp's two contexts map one GGUF), so both see the same machine at the same
  moment. Run-to-run swings of a whole process (up to 20% here) cancel in the ratio, which
  separate processes cannot give. The overhead is the median over rounds of each process's
  ratio of medians.

llama.cpp's threads spin at barriers and starve when another process holds a core, and so do
ours: run it on an idle machine (the JSON records the load average at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from edgelora.bench.common import export  # noqa: E402
from edgelora.bench.quality import llama_cpp_files  # noqa: E402
from edgelora.realmodels import MODELS, cache_dir, gguf_file, hf_dir  # noqa: E402

ADAPTER = ROOT / "examples" / "smollm2" / "adapters" / "isodate"
PROMPT_TOKENS, DECODE_STEPS = 128, 64
SDIST = "llama-cpp-python==0.3.36"  # the version bench/quality.py's build is


def lora_gguf(hf: Path, work: Path) -> Path:
    """The adapter as a GGUF LoRA, by llama.cpp's own converter."""
    out = work / "isodate-lora-f16.gguf"
    if out.is_file():
        return out
    sdist_dir = cache_dir() / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    found = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             SDIST], cwd=sdist_dir, check=True,
        )  # fmt: skip
        found = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    src = sdist_dir / found[0].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (src / "conversion" / "__init__.py").is_file():
        import tarfile

        with tarfile.open(found[0]) as tar:
            members = [
                m for m in tar.getmembers()
                if any(f"/vendor/llama.cpp/{p}" in m.name
                       for p in ("convert_", "conversion/", "gguf-py/"))
            ]  # fmt: skip
            tar.extractall(sdist_dir, members=members, filter="data")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    done = subprocess.run(
        [sys.executable, str(src / "convert_lora_to_gguf.py"), str(ADAPTER), "--base", str(hf),
         "--outtype", "f16", "--outfile", str(out)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(
            f"convert_lora_to_gguf failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return out


def token_ids(hf: Path) -> tuple[list[int], list[int]]:
    from tokenizers import Tokenizer

    from edgelora.quant.calibrate import held_out_text

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = tok.encode("\n\n".join(held_out_text()), add_special_tokens=False).ids
    return ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS : PROMPT_TOKENS + DECODE_STEPS]


# --- the worker: one candidate, one thread count, in its own process ----------------------
def worker(spec: dict) -> dict:
    prompt, steps, threads = spec["prompt"], spec["steps"], spec["threads"]
    specs = [spec["a"], spec["b"]] if spec["kind"] == "pair" else [spec]
    if specs[0]["kind"] == "et":
        from edgelora.runtime.native import native_output, set_threads

        with native_output(None):
            set_threads(threads)
            times = _measure([_et_forward(s) for s in specs], prompt, steps)
    else:
        times = _measure([_llama_forward(s, threads) for s in specs], prompt, steps)
    prefill = [len(prompt) / statistics.median(t) for t in times["prefill"]]
    decode = [1e3 * statistics.median(t) for t in times["decode"]]
    if spec["kind"] != "pair":
        return {"prefill_tokens_per_s": prefill[0], "decode_ms_per_token": decode[0]}
    return {
        "decode_ms_a": decode[0],
        "decode_ms_b": decode[1],
        "decode_overhead": decode[1] / decode[0] - 1,
        "prefill_tokens_per_s_a": prefill[0],
        "prefill_tokens_per_s_b": prefill[1],
    }


def _llama_forward(spec: dict, threads: int):
    import llama_cpp

    kw = {"lora_path": spec["lora"]} if spec.get("lora") else {}
    llm = llama_cpp.Llama(
        spec["path"], n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
        verbose=False, **kw,
    )  # fmt: skip

    def forward(tokens: list[int], start: int) -> None:
        llm.n_tokens = start  # rewind the KV cache to ``start``
        llm.eval(tokens)

    return forward


def _et_forward(spec: dict):
    out = Path(spec["path"])
    if spec.get("session"):
        from edgelora.runtime.sessions import AdapterSession

        session = AdapterSession(out, spec["session"])
        session.use_adapter(spec.get("adapter"))
        program = session.program
    else:
        from edgelora.format.manifest import read_export
        from edgelora.runtime.program import LlamaProgram

        entry = read_export(out).programs[spec.get("adapter") or "base"]
        program = LlamaProgram(out / entry.file, out / entry.foundation)
    return program.forward


def _measure(forwards: list, prompt: list[int], steps: list[int]) -> dict[str, list]:
    """Seconds of each forward's prefills and decode steps; several forwards (in one process)
    alternate: each prefill in turn, then step by step."""
    for f in forwards:
        f(prompt, 0)  # warm-up (XNNPACK packs, llama.cpp maps)
    prefill: list[list[float]] = [[] for _ in forwards]
    for _ in range(3):
        for i, f in enumerate(forwards):
            t = time.perf_counter()
            f(prompt, 0)
            prefill[i].append(time.perf_counter() - t)
    decode: list[list[float]] = [[] for _ in forwards]
    for j, tok in enumerate(steps):
        for i, f in enumerate(forwards):
            t = time.perf_counter()
            f([tok], len(prompt) + j)
            decode[i].append(time.perf_counter() - t)
    return {"prefill": prefill, "decode": decode}


# --- the driver ----------------------------------------------------------------------------
def candidates(work: Path, hf: Path) -> dict[str, dict]:
    # (the exports bench/adapter_quality.py measures)
    default, q8 = work / "q4_k_m-isodate", work / "q8_0-isodate"
    int8, last = work / "q4_k_m-isodate-int8", work / "q4_k_m-isodate-last"
    lora = ["--lora", f"isodate={ADAPTER}"]
    for out, flags in (
        (default, [*lora, "--switchable"]),
        (q8, ["--recipe", "q8_0", *lora]),
        (int8, [*lora, "--adapter-dtype", "int8"]),
        (last, [*lora, "--logits", "last"]),
    ):
        if not (out / "manifest.json").is_file():
            export(flags, hf, out)
    llama = llama_cpp_files(gguf_file(MODELS["smollm2-135m"]), work)
    gguf_lora = str(lora_gguf(hf, work))
    out = {
        "ours q4_k_m (default)": {"kind": "et", "path": str(default)},
        "ours q4_k_m + isodate.pte": {"kind": "et", "path": str(default), "adapter": "isodate"},
        "ours q4_k_m + isodate.pte (int8 adapter)": {
            "kind": "et",
            "path": str(int8),
            "adapter": "isodate",
        },
        "ours q4_k_m switchable + isodate": {
            "kind": "et",
            "path": str(default),
            "adapter": "isodate",
            "session": "switchable",
        },
        "ours q8_0": {"kind": "et", "path": str(q8)},
        "ours q4_k_m --logits last": {"kind": "et", "path": str(last)},
        "ours q4_k_m --logits last + isodate.pte": {
            "kind": "et",
            "path": str(last),
            "adapter": "isodate",
        },
    }
    for name, path in llama.items():
        out[f"llama.cpp {name}"] = {"kind": "llama", "path": str(path)}
        out[f"llama.cpp {name} + --lora"] = {"kind": "llama", "path": str(path), "lora": gguf_lora}
    return out


def pairs(cands: dict[str, dict]) -> dict[str, dict]:
    """Each adapter form beside its own base, for ``--paired``."""
    out = {}
    for name, spec in cands.items():
        if spec.get("adapter") or spec.get("lora"):
            base = {k: v for k, v in spec.items() if k not in ("adapter", "session", "lora")}
            out[name] = {"kind": "pair", "a": base, "b": spec}
    return out


def run_worker(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"worker {spec['kind']} {spec['path']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], threads: list[int]) -> str:
    head = "| candidate | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |"
    lines = [
        "decode ms/token (prefill tokens/s of a 128-token prompt), medians over rounds",
        "",
        head,
        "|---|" + "---:|" * len(threads),
    ]
    for name, by_t in rows.items():
        cells = [
            f"{by_t[str(t)]['decode_ms_per_token']:.2f} ({by_t[str(t)]['prefill_tokens_per_s']:.0f})"
            for t in threads
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=cache_dir() / "smollm2-135m" / "speed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--only", default=None, help="comma-separated substrings of candidate names")
    p.add_argument(
        "--paired",
        action="store_true",
        help="measure each adapter form against its base in one process, alternating steps "
        "(the adapter overhead); writes JSON's -overhead sibling",
    )
    p.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "speed-smollm2-135m.json"
    )
    ns = p.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return
    threads = [int(t) for t in ns.threads.split(",")]
    ns.work.mkdir(parents=True, exist_ok=True)
    hf = hf_dir(MODELS["smollm2-135m"])
    prompt, steps = token_ids(hf)
    cands = candidates(ns.work, hf)
    if ns.only:
        keys = ns.only.split(",")
        cands = {n: c for n, c in cands.items() if any(k in n for k in keys)}
    if ns.paired:
        cands, path = pairs(cands), ns.json.with_name(ns.json.stem + "-overhead.json")
    else:
        path = ns.json
    load = [os.getloadavg()[0]]
    samples: dict[str, dict[str, list[dict]]] = {n: {str(t): [] for t in threads} for n in cands}
    for r in range(ns.rounds):
        for t in threads:
            for name, spec in cands.items():
                got = run_worker({**spec, "threads": t, "prompt": prompt, "steps": steps})
                samples[name][str(t)].append(got)
                if ns.paired:
                    said = (f"decode {got['decode_ms_a']:.2f} -> {got['decode_ms_b']:.2f} ms "
                            f"({100 * got['decode_overhead']:+.1f}%)")  # fmt: skip
                else:
                    said = (f"decode {got['decode_ms_per_token']:.2f} ms, prefill "
                            f"{got['prefill_tokens_per_s']:.0f} tok/s")  # fmt: skip
                print(f"round {r + 1}/{ns.rounds} {t}t {name}: {said}", flush=True)
    load.append(os.getloadavg()[0])
    rows = {
        n: {
            t: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
            for t, runs in by_t.items()
        }
        for n, by_t in samples.items()
    }
    result = {
        "model": "smollm2-135m",
        "adapter": "examples/smollm2/adapters/isodate",
        "prompt_tokens": len(prompt),
        "decode_steps": len(steps),
        "rounds": ns.rounds,
        "load_average_start_end": load,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "samples": samples,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    md = overhead_table(samples, rows, threads) if ns.paired else table(rows, threads)
    path.with_suffix(".md").write_text(md + "\n")
    print(md)


def overhead_table(samples: dict, rows: dict, threads: list[int]) -> str:
    lines = [
        "adapter decode overhead, base and adapter form alternating step by step in one process: "
        "median over rounds (range), and the base -> adapter decode ms/token",
        "",
        "| adapter form | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads) + " |",
        "|---|" + "---:|" * len(threads),
    ]
    for name, by in samples.items():
        cells = []
        for t in threads:
            runs, row = by[str(t)], rows[name][str(t)]
            lo, hi = (100 * f(s["decode_overhead"] for s in runs) for f in (min, max))
            cells.append(
                f"{100 * row['decode_overhead']:+.1f}% ({lo:+.1f}..{hi:+.1f}); "
                f"{row['decode_ms_a']:.2f} -> {row['decode_ms_b']:.2f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
