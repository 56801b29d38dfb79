"""Benchmark harness: our export against ExecuTorch's own Llama example and eager PyTorch.

    python bench/run.py --config stories15m|stories110m|mla-small|tiny [--rounds 3]
        [--eager-rounds 1]
        [--variants split,fused] [--no-baseline] [--work DIR] [--results bench/results]

For one named config, with the same random weights (written once as a Meta ``.pth``) and the
same rank-16 adapter on every projection:

1. exports with our ``export_llama`` (base + adapter, 8da4w g32, ``--logits last`` as the
   example's default; ``split``: unfused, fp32 embedding; ``fused``: ``--fuse all`` and a
   4-bit embedding) and with ExecuTorch's example
   (``bench/et_baseline.py``: same checkpoint, 8da4w g32, XNNPACK, KV cache + custom SDPA, its
   LoRA and foundation-file options), recording wall time and peak RSS of each export process;
2. runs every program on ``executorch.runtime`` in its own subprocess -- prefill of a 128-token
   prompt (median of 3) and decode (median of 64 steps after an 8-token prefill) -- for
   ``--rounds`` rounds in alternating order, so machine drift cancels in the ratios;
3. measures eager PyTorch (fp32, and torchao 8da4w) the same way, in the first
   ``--eager-rounds`` rounds (default 1: they are slow references, not A/B pairs);
4. records every file's size and what each adapter adds;
5. measures this machine's memory read bandwidth and shows each decode time as a multiple of
   the bound (weight bytes read per token / bandwidth);

and writes ``<results>/<config>.json``, ``<config>.md`` (tables) and ``<config>-decode.png`` /
``<config>-sizes.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from edgelora.bench.common import CONFIGS, measure  # noqa: E402
from edgelora.bench.report import ADAPTER, VARIANTS, bound, figures_of, markdown, plots  # noqa: E402


# --------------------------------------------------------------------------- child processes
def _child_program(pte: str, ptd: str, vocab: int) -> dict:
    from edgelora.runtime.program import LlamaProgram

    return measure(LlamaProgram(pte, ptd or None, allow_unverified=True), vocab)


def _child_eager(work: str, config: str, qmode: str) -> dict:
    import torch

    from edgelora.ci.output_match import eager_generate
    from edgelora.export.config import FoundationSpec
    from edgelora.export.foundation import build_foundation
    from edgelora.models.args import ModelArgs
    from edgelora.quant.recipe import Recipe

    args = ModelArgs.from_dict(CONFIGS[config])
    # logits "last", as the programs compared with it
    recipe = Recipe(qmode, qmode=qmode, output_qmode=qmode)
    spec = FoundationSpec(recipe=recipe, checkpoint=Path(work) / "model.pth", logits="last")
    model, _, _ = build_foundation(args, spec)
    model.eval()

    class Eager:  # the LlamaProgram interface measure uses
        def forward(self, tokens, start):
            if start == 0:
                model.reset_cache()
            with torch.no_grad():
                return model(torch.tensor([tokens]), torch.tensor([start]))[0]

        def generate(self, prompt, n):
            return eager_generate(model, prompt, n)

    return measure(Eager(), args.vocab_size)


def _child_bandwidth() -> dict:
    """Read bandwidth: sum a 512 MiB float32 tensor with torch's threads, best of 7."""
    import torch

    x = torch.ones(128 * 2**20)
    x.sum()
    best = math.inf
    for _ in range(7):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return {"read_gb_per_s": x.numel() * 4 / best / 1e9, "threads": torch.get_num_threads()}


def _child_profile(pte: str, ptd: str) -> dict:
    """Where a decode step's time goes (ETDump): the XNNPACK 4-bit GEMMs are the floor the
    delegate's kernels put under decode, whatever runs around them."""
    from edgelora.bench.delegate_profile import profile_program

    prof = profile_program(Path(pte), Path(ptd) if ptd else None, 32)
    gemm = sum(r["ms"] for k, r in prof["xnnpack"].items() if "QB4W" in k or "QC4W" in k)
    keys = ("step_ms", "delegate_ms", "delegate_calls", "portable_ms", "portable_ops")
    return {**{k: prof[k] for k in keys}, "gemm_4bit_ms": gemm}


def _child(argv: list[str]) -> dict:
    kind = argv[0]
    if kind == "profile":
        return _child_profile(argv[1], argv[2])
    if kind == "program":
        return _child_program(argv[1], argv[2], int(argv[3]))
    if kind == "eager":
        return _child_eager(argv[1], argv[2], argv[3])
    return _child_bandwidth()


def _run_child(*argv: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"child {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- the harness
def _inputs(config: str, work: Path) -> tuple[dict, object, object]:
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.weights.adapter_files import save_peft_adapter
    from edgelora.weights.synthetic import random_adapter
    from edgelora.weights.tensor_files import save_checkpoint

    params = CONFIGS[config]
    args = ModelArgs.from_dict(params)
    model = build_model(args, seed=0)
    adapter = random_adapter(model, ADAPTER, rank=16, alpha=32, seed=10)
    (work / "params.json").write_text(json.dumps(params))
    save_checkpoint(model, work / "model.pth")
    save_peft_adapter(adapter, work / "adapter", args)
    return params, model, adapter


_STAGE = re.compile(
    r"^\[(?P<name>[^\]]+)\] (?P<s>[0-9.]+) s( \(peak RSS \d+ MiB, so far \d+ MiB\))?$"
)


def _our_export(work: Path, variant: str) -> dict:
    from edgelora.bench.et_baseline import run_et_export

    out = work / f"ours-{variant}"
    cmd = [
        str(Path(sys.executable).with_name("export_llama")),
        "--params", str(work / "params.json"),
        "--checkpoint", str(work / "model.pth"),
        "--lora", f"{ADAPTER}={work / 'adapter'}",
        "--output-dir", str(out),
        "--overwrite",
        *VARIANTS[variant],
    ]  # fmt: skip
    rec = run_et_export(cmd, out)  # writes out/ (staged beside it, then renamed into place)
    stages = {}
    for line in rec.pop("output").splitlines():
        m = _STAGE.match(line.strip())
        if m:
            stages[m["name"]] = float(m["s"])
    rec["stages_s"] = stages
    rec["adapter_export_s"] = sum(s for n, s in stages.items() if n.startswith(f"{ADAPTER}:"))
    rec["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    rec["programs"] = {
        "base": (out / "base.pte", out / "foundation.ptd"),
        "lora": (out / f"{ADAPTER}.pte", out / "foundation.ptd"),
    }
    return rec


def _baseline_export(work: Path, params: dict, model, adapter) -> dict:
    from edgelora.bench.et_baseline import et_export_command, run_et_export, write_et_inputs

    inputs = write_et_inputs(work / "et", params, model, adapter)
    recs = {}
    for name, lora in (("base", False), ("lora", True)):
        out = work / "et" / name
        cmd = et_export_command(
            inputs, out, name=name, lora=lora, foundation=True, max_seq_len=params["max_seq_len"]
        )
        recs[name] = run_et_export(cmd, out)
        recs[name].pop("output")
        recs[name]["program"] = (out / f"{name}.pte", out / f"{name}_foundation.ptd")
    from edgelora.format.layout import sha256_file

    same = sha256_file(recs["base"]["program"][1]) == sha256_file(recs["lora"]["program"][1])
    recs["base"]["foundation_shared_with_lora"] = same
    return recs


def _load_exports(path: Path) -> dict:
    """exports.json back, with program paths as Paths."""
    exports = json.loads(path.read_text())
    for name, rec in exports.items():
        if name.startswith("ours-"):
            rec["programs"] = {r: tuple(map(Path, ps)) for r, ps in rec["programs"].items()}
        elif name == "executorch":
            for r in rec.values():
                r["program"] = tuple(map(Path, r["program"]))
    return exports


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2:])))
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="stories15m",
        help="model size (stories15M/110M-sized Llama, an MLA model, or tiny for tests)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument(
        "--variants", default="split,fused", help=f"our export variants, of {sorted(VARIANTS)}"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip ExecuTorch's example (tests)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager references")
    p.add_argument(
        "--eager-rounds",
        type=int,
        default=1,
        help="rounds that also measure the eager references (slow: torchao's eager 8da4w "
        "dequantizes every weight at every call; they are references, not A/B pairs; default 1)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="directory for the checkpoint, adapter and exports (default: a new temp directory)",
    )
    p.add_argument(
        "--reuse", action="store_true", help="reuse the exports an earlier run made in --work"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=HERE / "results",
        help="where <config>.json/.md and the PNG plots go (default: bench/results)",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only re-compute the decode bound of an earlier run's <config>.json and re-write it, "
        "its Markdown table and plots (measures nothing)",
    )
    ns = p.parse_args()
    if ns.render is not None:
        figures = json.loads(ns.render.read_text())
        bw = figures["bandwidth"]["read_gb_per_s"] * 1e9
        for name, b in figures["bound"].items():  # the bound as this version computes it
            base_ms = figures["median"][f"{name}/base"]["decode_ms_per_token"]
            files = figures["exports"][name]["files"]
            b.update(bound(files, figures["model"], name.removeprefix("ours-"), bw, base_ms))
            if "gemm_4bit_ms" in b:
                b["gemm_4bit_over_bound"] = b["gemm_4bit_ms"] / b["decode_bound_ms"]
        ns.render.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        ns.render.with_suffix(".md").write_text(markdown(figures))
        plots(figures, ns.render.with_suffix(""))
        print(markdown(figures))
        return
    variants = [v for v in ns.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    work = ns.work or Path(tempfile.mkdtemp(prefix=f"edgelora-bench-{ns.config}-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731

    saved = work / "exports.json"
    params = CONFIGS[ns.config]
    exports, adapter_bytes = {}, None
    if ns.reuse and saved.is_file():  # measure again; export only what is missing
        exports = _load_exports(saved)
        adapter_bytes = exports.pop("adapter_bytes")
        log(f"== reusing {sorted(exports)} recorded in {saved}")
    todo = [v for v in variants if f"ours-{v}" not in exports]
    need_baseline = not ns.no_baseline and "executorch" not in exports
    if todo or need_baseline:
        params, model, adapter = _inputs(ns.config, work)
        adapter_bytes = adapter.num_bytes
        for v in todo:
            log(f"== export: ours ({v})")
            exports[f"ours-{v}"] = _our_export(work, v)
        if need_baseline:
            log("== export: ExecuTorch example (base, then LoRA)")
            exports["executorch"] = _baseline_export(work, params, model, adapter)
        saved.write_text(json.dumps({**exports, "adapter_bytes": adapter_bytes}, default=str))
    if ns.no_baseline:
        exports.pop("executorch", None)
    variants = [v for v in variants if f"ours-{v}" in exports]

    programs: dict[str, tuple[Path, Path | None]] = {}
    for v in variants:
        for role, paths in exports[f"ours-{v}"]["programs"].items():
            programs[f"ours-{v}/{role}"] = paths
    if "executorch" in exports:
        for role in ("base", "lora"):
            programs[f"executorch/{role}"] = exports["executorch"][role]["program"]

    log("== memory bandwidth")
    bandwidth = _run_child("bandwidth")
    runs: dict[str, list[dict]] = {k: [] for k in programs}
    eager = [] if ns.no_eager else ["eager-fp32", "eager-8da4w"]
    runs.update({k: [] for k in eager})
    for r in range(ns.rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for key in order:
            if key.startswith("eager") and r >= ns.eager_rounds:
                continue
            if key.startswith("eager"):
                qmode = "none" if key == "eager-fp32" else "8da4w"
                row = _run_child("eager", str(work), ns.config, qmode)
            else:
                pte, ptd = programs[key]
                row = _run_child("program", str(pte), str(ptd or ""), str(params["vocab_size"]))
            runs[key].append(row)
            log(
                f"  round {r} {key}: decode {row['decode_ms_per_token']:.3f} ms/token, "
                f"prefill {row['prefill_tokens_per_s']:.0f} tok/s"
            )

    median = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    log("== ETDump profile of each base program (32 decode steps)")
    profiles = {}
    for key, (pte, ptd) in programs.items():
        if key.endswith("/base"):
            profiles[key] = _run_child("profile", str(pte), str(ptd or ""))
            log(f"  {key}: {json.dumps(profiles[key])}")
    figures = figures_of(ns.config, params, exports, median, runs, bandwidth, adapter_bytes)
    figures["profile"] = profiles
    for name, b in figures["bound"].items():
        if f"{name}/base" in profiles:
            b["gemm_4bit_ms"] = profiles[f"{name}/base"]["gemm_4bit_ms"]
            b["gemm_4bit_over_bound"] = b["gemm_4bit_ms"] / b["decode_bound_ms"]
    ns.results.mkdir(parents=True, exist_ok=True)
    stem = ns.results / ns.config  # names may hold dots (qwen3-0.6b-4l): no with_suffix
    (ns.results / f"{ns.config}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (ns.results / f"{ns.config}.md").write_text(markdown(figures))
    plots(figures, stem)
    print(markdown(figures))


if __name__ == "__main__":
    main()
