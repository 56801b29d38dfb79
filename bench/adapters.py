"""Adapters as updates, measured: what adding an adapter costs, what the adapter dtypes cost in
bytes and quality, and the switchable program's decode speed against ``base.pte``.

    python bench/adapters.py [--model DIR --adapters DIR/adapters --eval DIR/eval]
                             [--work DIR] [--rounds 5] [--limit N] [--json OUT.json]

Defaults to the trained tiny model shipped in ``examples/tiny`` (two PEFT adapters with
held-out task files). For each adapter dtype (fp32, fp16, int8) it exports the model with the
first adapter and ``--switchable --adapter-template --adapter-dtype D``, then, timed, adds the
second adapter with ``export_llama --add-to`` and no model arguments (its switchable inputs and
its program made from ``template.pte``: no lowering), adds it again under ``NAME_lowered`` as a
lowered program (``--checkpoint``: one lowering), and compares with a full re-export. Every adapter is scored
on its task file through the switchable program on the runtime (exact-match accuracy,
perplexity, max |logit - fp32's|), and the first adapter through its lowered program
(``NAME.pte``) in each dtype.

``--config stories15m|stories110m`` instead writes a random model of that shape (Meta
checkpoint + ``params.json``) and two random rank-16 adapters on every projection (and
``qv8``, PEFT's default for Llama: rank 8 on q_proj and v_proj, added as a lowered program), exports it
with fp32, fp16 and int8 adapters (the add times measured once, on fp32), writes each adapter
dtype's input file from the same model, and scores nothing (a random model has no task).

``--scale llama-3.2-1b [--layers N]`` instead measures decode at a real model's shape:
``bench/scale.py``'s random bf16 checkpoint and rank-16 all-projection adapter, exported with
its recipe plus ``--switchable --adapter-template --adapter-dtype int8``, the adapter added again
from ``template.pte`` (fp32); decode of ``base.pte``, both adapter programs and the switchable
program, and template-session switches (at this size XNNPACK repacks a large foundation).
``--program-dtypes fp16,int8`` also exports base and adapter programs only with each
``--adapter-dtype`` (into ``ours-D``; their ``foundation.ptd`` must equal the first export's,
which the adapter programs are then loaded with) and measures those adapter programs too.

A template session's switch (make the program from ``template.pte`` and the adapter's inputs,
load it, one forward: XNNPACK packs the foundation then) is timed four times.
Decode ms/token of ``base.pte``, the adapter programs (lowered, and made from the template) and
the switchable program (with an adapter selected) is the median step of a 32-token greedy generation in ``--rounds`` rounds
alternating over all of them in one process, for each ``--threads`` size of the XNNPACK
threadpool.
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
DTYPES = ("fp32", "fp16", "int8")


def _cli(*argv: str) -> float:
    cmd = [sys.executable, "-m", "edgelora.export.cli", *map(str, argv)]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=TINY / "model")
    p.add_argument("--adapters", type=Path, default=TINY / "adapters")
    p.add_argument("--eval", type=Path, default=TINY / "eval")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="score the first N lines per task")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--config", default=None, help="a random model of bench/common.py's CONFIGS")
    p.add_argument(
        "--threads", type=lambda s: [int(t) for t in s.split(",")], default=[2, 1],
        help="XNNPACK threadpool sizes to measure decode with (default 2,1)",
    )  # fmt: skip
    p.add_argument(
        "--scale", default=None, choices=["llama-3.2-1b", "llama-3.2-3b", "qwen3-4b"],
        help="instead: decode speed at a real model's shape (bench/scale.py's inputs and recipe)",
    )  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="with --scale: the first N layers")
    p.add_argument(
        "--program-dtypes", type=lambda s: s.split(","), default=[],
        help="with --scale: also export adapter programs with these --adapter-dtype values",
    )  # fmt: skip
    p.add_argument(
        "--reuse", action="store_true",
        help="with --scale: measure the export an earlier run left in --work instead of exporting",
    )  # fmt: skip
    ns = p.parse_args()
    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    result = _at_scale(ns, work) if ns.scale else _updates(ns, work)
    print(json.dumps(result, indent=1))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1) + "\n")


def _updates(ns, work: Path) -> dict:
    """The default and ``--config`` runs: export, add (from the template and lowered),
    re-export with both adapters, score or size the adapter files, then decode."""
    dtypes, model_args, options = DTYPES, ["--checkpoint", ns.model], []
    if ns.config:
        ns.adapters, model_args, extra_bytes = _random_inputs(ns.config, work)
        options = ["--logits", "last"]  # as bench/run.py's programs
    common = [*model_args, *options, "--switchable", "--adapter-template"]
    first, second = sorted(d.name for d in ns.adapters.iterdir() if d.is_dir())[:2]
    result: dict = {"model": ns.config or str(ns.model), "adapters": [first, second], "dtypes": {}}
    for dtype in dtypes:
        out = work / dtype
        rec = result["dtypes"][dtype] = {}
        rec["export_s"] = _cli(
            *common, "--adapter-dtype", dtype, f"--lora={first}={ns.adapters / first}",
            "--output-dir", out, "--overwrite",
        )  # fmt: skip
        rec["adapter_program_bytes"] = (out / f"{first}.pte").stat().st_size
        if ns.config and dtype != "fp32":  # a random model: the add times once (fp32)
            continue
        # inputs + NAME.pte from template.pte
        rec["add_template_s"] = _cli("--add-to", out, f"--lora={second}={ns.adapters / second}")
        rec["add_program_s"] = _cli(
            "--add-to", out, f"--lora={second}_lowered={ns.adapters / second}", *model_args
        )
        if (ns.adapters / "qv8").is_dir():  # a lowered program of PEFT's default adapter
            _cli("--add-to", out, f"--lora=qv8={ns.adapters / 'qv8'}", *model_args)
        rec["full_export_both_s"] = _cli(
            *common, "--adapter-dtype", dtype, f"--lora={first}={ns.adapters / first}",
            f"--lora={second}={ns.adapters / second}", "--output-dir", work / f"{dtype}-full",
            "--overwrite",
        )  # fmt: skip
        rec["input_bytes"] = {
            a: (out / f"{a}.lora.safetensors").stat().st_size for a in (first, second)
        }
        print(f"{dtype}: {json.dumps(rec)}", flush=True)
    if ns.config:
        result["input_bytes_per_dtype"] = extra_bytes
        result["parameters_per_adapter"] = extra_bytes.pop("parameters")
    else:
        _score(result, work, ns, (first, second))
    for threads in ns.threads:
        _decode(result, work, ns.rounds, (first, second), dtypes, threads)
    return result


def _score(result: dict, work: Path, ns, adapters: tuple[str, str]) -> None:
    """Each adapter through the switchable program in each dtype, then the first adapter
    through its lowered program in each dtype; logit errors against the fp32 run's."""
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.tasks import read_eval_file

    runs = [(a, True, "tasks") for a in adapters] + [(adapters[0], False, "program_task")]
    for adapter, switchable, key in runs:
        s, ref = read_eval_file(ns.eval / f"{adapter}.jsonl", ns.limit), None
        for dtype in DTYPES:
            out = work / dtype
            scorer = open_runtime(out, adapter=adapter, switchable=switchable)
            rec, logits = _task(out, scorer, s, ref)
            ref = ref or logits
            result["dtypes"][dtype].setdefault(key, {})[adapter] = rec
            print(f"{scorer.label} {dtype}: {json.dumps(rec)}")


def _task(out: Path, scorer, s, ref: list | None) -> tuple[dict, list]:
    """Exact-match accuracy and perplexity of ``scorer`` on the task set ``s``, and its max
    |logit - ref's| over the first 20 items (0 without ``ref``); and those logits."""
    from tokenizers import Tokenizer

    from edgelora.format.manifest import read_export
    from edgelora.quality.scoring import encode_set, score_set

    manifest = read_export(out)
    tok = Tokenizer.from_file(str(out / manifest.tokenizer))
    enc = encode_set(s, tok)
    r = score_set(scorer, s, enc, tok, manifest.eos_ids)
    logits = [scorer.logits(e.ids) for e in enc[:20]]
    err = max((a - b).abs().max().item() for a, b in zip(logits, ref or logits, strict=True))
    rec = {"accuracy": r.accuracy, "perplexity": r.perplexity, "max_abs_logit_diff_vs_fp32": err}
    return rec, logits


def _random_inputs(config: str, work: Path) -> tuple[Path, list, dict]:
    """A random ``config``-shaped checkpoint and two random adapters in ``work``; the export
    arguments; each adapter dtype's ``.lora.safetensors`` bytes for the first adapter."""
    from edgelora.bench.common import CONFIGS
    from edgelora.export.programs import write_adapter_inputs
    from edgelora.format.adapter_inputs import ADAPTER_DTYPES
    from edgelora.lora.slots import adapter_slots
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.weights.adapter_files import save_peft_adapter
    from edgelora.weights.synthetic import random_adapter
    from edgelora.weights.tensor_files import save_checkpoint

    params = CONFIGS[config]
    args = ModelArgs.from_dict(params)
    model = build_model(args, seed=0)
    (work / "params.json").write_text(json.dumps(params))
    save_checkpoint(model, work / "model.pth")
    adapters = [random_adapter(model, f"a{i}", rank=16, alpha=32, seed=10 + i) for i in (0, 1)]
    # PEFT's default LoRA for Llama: rank 8 on q_proj and v_proj
    qv8 = random_adapter(model, "qv8", rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=12)
    for a in [*adapters, qv8]:
        save_peft_adapter(a, work / "adapters" / a.name, args)
    slots = adapter_slots(model, adapters[:1])
    sizes = {"parameters": sum(s.in_features * s.rank + s.rank * s.out_features for s in slots)}
    for name in DTYPES:
        path = work / f"inputs-{name}.safetensors"
        write_adapter_inputs(model, adapters[0], slots, ADAPTER_DTYPES[name], path)
        sizes[name] = path.stat().st_size
        # qv8's file for the same slots (rank 16 on every projection): its own parameters only
        path = work / f"inputs-qv8-{name}.safetensors"
        write_adapter_inputs(model, qv8, slots, ADAPTER_DTYPES[name], path)
        sizes[f"qv8 {name}"] = path.stat().st_size
    sizes["qv8 parameters"] = sum(w.lora_a.numel() + w.lora_b.numel() for w in qv8.modules.values())
    return (
        work / "adapters",
        ["--params", work / "params.json", "--checkpoint", work / "model.pth"],
        sizes,
    )


def _decode(
    result: dict, work: Path, rounds: int, adapters: tuple[str, str], dtypes=DTYPES, threads=2
) -> None:
    from executorch.extension.pybindings import portable_lib

    from edgelora.runtime.program import LlamaProgram
    from edgelora.runtime.sessions import AdapterSession

    portable_lib._unsafe_reset_threadpool(threads)
    fp32, (adapter, second) = work / "fp32", adapters
    programs = {
        "base.pte": LlamaProgram(fp32 / "base.pte", fp32 / "foundation.ptd"),
        f"{adapter}.pte": LlamaProgram(fp32 / f"{adapter}.pte", fp32 / "foundation.ptd"),
    }
    for name, label in (
        (f"{second}_lowered", f"{second}.pte (lowered)"),
        (second, f"{second}.pte (from template.pte)"),
        ("qv8", "qv8.pte (rank 8 on q, v; lowered)"),
    ):
        if (fp32 / f"{name}.pte").exists():
            path = fp32 / f"{name}.pte"
            programs[label] = LlamaProgram(path, fp32 / "foundation.ptd")
    for dtype in ("fp16", "int8"):  # the adapter programs with fp16 / int8 lora_A/lora_B
        if dtype in dtypes:
            d = work / dtype
            programs[f"{adapter}.pte ({dtype} adapter)"] = LlamaProgram(
                d / f"{adapter}.pte", d / "foundation.ptd"
            )
    if (fp32 / "template.pte").exists():
        _template_switches(result, fp32, (adapter, second, adapter, second), threads)
    for dtype in dtypes:
        session = AdapterSession(work / dtype, "switchable")
        session.use_adapter(adapter)
        programs[f"switchable ({dtype} inputs)"] = session.program
    _alternate(result, programs, rounds, threads, steps=32)


def _template_switches(result: dict, out: Path, names: tuple[str, ...], threads: int) -> None:
    """Time template-session switches: make the program, load it (XNNPACK packs the
    foundation then), one forward."""
    from edgelora.runtime.sessions import AdapterSession

    session = AdapterSession(out, "template")
    switch = []
    for name in names:
        t = time.perf_counter()
        session.use_adapter(name)
        session.generate([1, 2], 1)
        switch.append(time.perf_counter() - t)
    result.setdefault("template_switch_s", {})[f"{threads} threads"] = switch
    print(f"  template session switches: {', '.join(f'{x:.3f}' for x in switch)} s")


def _alternate(result: dict, programs: dict, rounds: int, threads: int, steps: int) -> None:
    """Median decode ms/token of each program (a ``steps``-token greedy generation after a
    16-token prompt) over ``rounds`` rounds alternating over all of them, and each against
    ``base.pte``'s, into ``result``."""
    prompt = list(range(3, 19))
    samples: dict[str, list[float]] = {n: [] for n in programs}
    for _ in range(rounds):
        for name, program in programs.items():
            samples[name].append(program.generate(prompt, steps).decode_ms_per_token)
    ms = {n: statistics.median(v) for n, v in samples.items()}
    base = ms["base.pte"]
    key = f"{threads} threads"
    result.setdefault("decode_ms_per_token", {})[key] = ms
    result.setdefault("decode_vs_base", {})[key] = {n: v / base for n, v in ms.items()}
    print(f"  decode with {threads} XNNPACK threads:")
    for n, v in ms.items():
        print(f"  {n:28s} {v:.3f} ms/token ({v / base:.2f}x base)")


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _at_scale(ns, work: Path) -> dict:
    """``--scale MODEL``: bench/scale.py's random bf16 checkpoint of a real model's shape and
    its rank-16 adapter on all seven projections, exported with bench/scale.py's recipe plus
    ``--switchable --adapter-template --adapter-dtype int8``; the adapter added again from
    ``template.pte`` (fp32); decode of base.pte, both adapter programs and the switchable
    program, and template-session switches."""
    from executorch.extension.pybindings import portable_lib

    from edgelora.bench import scale
    from edgelora.runtime.program import LlamaProgram
    from edgelora.runtime.sessions import AdapterSession

    if not (work / "hf" / "config.json").is_file():
        argv = [sys.executable, scale.__file__, "--_make", "--model", ns.scale, "--work", work]
        subprocess.run([*map(str, argv), *(["--layers", str(ns.layers)] if ns.layers else [])],
                       check=True)  # fmt: skip
    out, adapter = work / "ours", scale.ADAPTER
    template = f"{adapter}_template"
    result: dict = {"model": ns.scale, "layers": ns.layers, "rounds": ns.rounds}
    if ns.reuse and (out / f"{template}.pte").is_file():
        result["export"] = f"reused {out} (made by an earlier --scale run)"
    else:
        extra = ["--switchable", "--adapter-template", "--adapter-dtype", "int8"]
        result["export"] = scale.run_ours(work, extra)
        result["add_template_s"] = _cli("--add-to", out, f"--lora={template}={work / 'adapter'}")
    result["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    others = {}
    for dtype in ns.program_dtypes:
        d = others[dtype] = work / f"ours-{dtype}"
        rec = result.setdefault("program_dtypes", {}).setdefault(dtype, {})
        if not (ns.reuse and (d / f"{adapter}.pte").is_file()):
            rec["export"] = scale.run_ours(work, ["--adapter-dtype", dtype], out=d)
        rec["files"] = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
        if _sha256(d / "foundation.ptd") != _sha256(out / "foundation.ptd"):
            raise SystemExit(f"{d}/foundation.ptd differs from {out}/foundation.ptd")
        rec["foundation_identical"] = True
    print(json.dumps(result, indent=1), flush=True)
    for threads in ns.threads:
        portable_lib._unsafe_reset_threadpool(threads)  # before any program is loaded
        _template_switches(result, out, (adapter, template, adapter), threads)
        programs = {
            "base.pte": LlamaProgram(out / "base.pte", out / "foundation.ptd"),
            f"{adapter}.pte (int8 adapter, lowered)": LlamaProgram(
                out / f"{adapter}.pte", out / "foundation.ptd"
            ),
            f"{template}.pte (fp32, from template.pte)": LlamaProgram(
                out / f"{template}.pte", out / "foundation.ptd"
            ),
        }
        for dtype, d in others.items():
            programs[f"{adapter}.pte ({dtype} adapter, lowered, ours-{dtype})"] = LlamaProgram(
                d / f"{adapter}.pte", out / "foundation.ptd"
            )
        session = AdapterSession(out, "switchable")
        session.use_adapter(adapter)
        programs["switchable (int8 inputs)"] = session.program
        _alternate(result, programs, ns.rounds, threads, steps=32)
        del programs, session
    return result


if __name__ == "__main__":
    main()
