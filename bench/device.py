"""On-device figures (issue 6): base vs adapter programs, and adapter switching in one process.

    python bench/device.py --config stories15m|stories110m|tiny [--work DIR] [--rounds 3]
        [--json bench/results/device-<config>.json]

Exports (8da4w g32, fused projections, ExecuTorch's custom SDPA) the base program, one
adapter program and ``switchable.pte`` for four rank-16 adapters on every projection, then
measures, each in its own subprocess so resident memory does not mix, and in alternating
rounds so machine drift cancels in the ratios:

* ``base.pte`` and ``a0.pte``: prefill tokens/s of a 128-token prompt, time to first token
  (prefill + the first greedy token), decode ms/token (median of 64 steps), peak RSS;
* ``switchable.pte``: the same with adapter ``a0`` passed as inputs, then RSS with 1 and with
  4 adapters loaded, the latency of switching to a not-yet-loaded adapter (reads its
  ``.lora.safetensors``) and to a loaded one.

Targets (issue 6): adapter decode within 1.10x of base; RSS with 4 adapters <= RSS with 1 +
4 x adapter bytes + 10%; a switch < 50 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgelora.bench.common import CONFIGS, measure

ADAPTERS = ("a0", "a1", "a2", "a3")


def _child(kind: str, out: Path, vocab: int) -> dict:
    from executorch.runtime import Runtime

    from edgelora._memory import peak_rss_mib, resident_mib
    from edgelora.runtime.program import LlamaProgram, register_kernels
    from edgelora.runtime.sessions import AdapterSession

    register_kernels()
    Runtime.get()
    start = resident_mib()  # after torch/executorch imports: the figures are the program's
    if kind != "switchable":
        program = LlamaProgram(out / f"{kind}.pte", out / "foundation.ptd")
        row = measure(program, vocab)
        row["rss_mib"] = resident_mib() - start
        row["peak_rss_mib"] = peak_rss_mib()
        return row
    session = AdapterSession(out, mode="switchable")
    session.program.forward([1, 2], 0)
    rss_base = resident_mib() - start
    first_switch = session.use_adapter("a0")
    row = measure(session.program, vocab)
    row["rss_mib_1_adapter"] = resident_mib() - start
    switches = [first_switch]
    for name in ADAPTERS[1:]:
        switches.append(session.use_adapter(name))
        session.program.forward([1, 2], 0)
    row["rss_mib_4_adapters"] = resident_mib() - start
    cached = []
    for name in (*ADAPTERS, None) * 3:
        cached.append(session.use_adapter(name))
    row.update(
        rss_mib_no_adapter=rss_base,
        first_switch_ms=1e3 * max(switches),
        loaded_switch_ms=1e3 * statistics.median(cached),
        peak_rss_mib=peak_rss_mib(),
    )
    return row


def _run_child(kind: str, out: Path, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(out), str(vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(config: str, work: Path, log) -> tuple[Path, dict]:
    from edgelora.export.config import ExportConfig, FoundationSpec
    from edgelora.export.foundation import build_foundation
    from edgelora.export.pipeline import run_export
    from edgelora.format.adapter_inputs import save_adapter_tensors
    from edgelora.lora.slots import adapter_tensors
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.quant.recipe import preset
    from edgelora.weights.synthetic import random_peft_adapter

    args = ModelArgs.from_dict(CONFIGS[config])
    model = build_model(args)
    adapters = []
    for i, name in enumerate(ADAPTERS):
        path = work / "adapters" / name
        adapters.append(
            random_peft_adapter(model, path, args, name, rank=16, alpha=32, seed=10 + i)
        )
    out = work / "out"
    cfg = ExportConfig(
        model_args=args,
        output_dir=out,
        foundation=FoundationSpec.resolve(qmode="8da4w", group_size=32, fuse="all"),
        switchable=True,
        overwrite=True,
    )
    t = time.perf_counter()
    # One adapter program (a0) for the base/adapter comparison; the switchable program's slots
    # fit all four adapters (same targets and rank), so a1..a3 only need their input files.
    result = run_export(cfg, adapters[:1], log=log)
    export_s = time.perf_counter() - t
    spec = FoundationSpec(recipe=preset("f32"), seed=cfg.foundation.seed, fuse="all")
    foundation, _, _ = build_foundation(args, spec)
    switch = result.manifest.switchable
    files = dict(switch.adapters)
    for a in adapters[1:]:
        files[a.name] = f"{a.name}.lora.safetensors"
        tensors = adapter_tensors(foundation, a, switch.slots)
        save_adapter_tensors(out / files[a.name], tensors, switch.slots)
    switch = dataclasses.replace(switch, adapters=files)
    dataclasses.replace(result.manifest, switchable=switch).write(out)
    info = {
        "export_s": export_s,
        "stages_s": result.timings,
        "files_bytes": {n: e.size for n, e in result.manifest.files.items()},
        "adapter_bytes_fp32": adapters[0].num_bytes,
        "adapter_input_file_bytes": (out / "a0.lora.safetensors").stat().st_size,
    }
    return out, info


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="stories15m")
    p.add_argument("--work", type=Path, default=None, help="reuse an export made here earlier")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-device-"))
    work.mkdir(parents=True, exist_ok=True)
    vocab = CONFIGS[ns.config]["vocab_size"]
    info_path = work / "export-info.json"
    if (work / "out" / "switchable.pte").is_file() and info_path.is_file():
        out, info = work / "out", json.loads(info_path.read_text())
        print(f"reusing the export in {out}")
    else:
        out, info = _export(ns.config, work, lambda m: print(m, flush=True))
        info_path.write_text(json.dumps(info))
    rows: dict[str, list[dict]] = {k: [] for k in ("base", "a0", "switchable")}
    for r in range(ns.rounds):
        order = list(rows) if r % 2 == 0 else list(rows)[::-1]
        for kind in order:
            rows[kind].append(_run_child(kind, out, vocab))
            print(f"round {r}: {kind}: {json.dumps(rows[kind][-1])}", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in rows.items()}
    adapter_bytes = info["adapter_input_file_bytes"]
    sw = med["switchable"]
    limit = 1.1 * (sw["rss_mib_1_adapter"] + 4 * adapter_bytes / 2**20)
    figures = {
        "config": ns.config,
        "model": CONFIGS[ns.config],
        "export": info,
        "median": med,
        "rounds": rows,
        "ratios": {
            "adapter_program_decode_over_base": med["a0"]["decode_ms_per_token"]
            / med["base"]["decode_ms_per_token"],
            "switchable_decode_over_base": sw["decode_ms_per_token"]
            / med["base"]["decode_ms_per_token"],
            "switchable_prefill_over_base": sw["prefill_tokens_per_s"]
            / med["base"]["prefill_tokens_per_s"],
        },
        "switch_target": {
            "rss_4_adapters_mib": sw["rss_mib_4_adapters"],
            "limit_mib": limit,
            "met": sw["rss_mib_4_adapters"] <= limit,
            "first_switch_ms": sw["first_switch_ms"],
            "loaded_switch_ms": sw["loaded_switch_ms"],
        },
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
