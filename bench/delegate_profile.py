"""Where a decode step's time goes: ETDump profile of exported programs on the ExecuTorch runtime.

    python bench/delegate_profile.py EXPORT_DIR [EXPORT_DIR ...] [--steps 32] [--json OUT.json]

For every program in each export directory (read from its manifest), prefills a 16-token prompt,
decodes ``--steps`` tokens with ETDump profiling on, and reports per decode step (median over
steps): the number of XNNPACK delegate calls and their time, the XNNPACK operators inside the
delegates by kind (count and time), and the operators that run outside any delegate (portable
kernels) by name (count and time). A switchable program is profiled with its first adapter's
inputs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

PROMPT = 16


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def profile_program(pte: Path, ptd: Path, steps: int, extra: list | None = None) -> dict:
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from edgelora.runtime.program import register_kernels

    register_kernels()
    program = Runtime.get().load_program(
        pte, data_path=ptd, enable_etdump=True, debug_buffer_size=0
    )
    forward = program.load_method("forward")
    extra = extra or []  # a switchable program's lora inputs
    forward.execute([torch.arange(3, 3 + PROMPT).view(1, -1), torch.tensor([0]), *extra])
    for i in range(steps):
        forward.execute([torch.tensor([[5 + i % 7]]), torch.tensor([PROMPT + i]), *extra])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        frame = Inspector(etdump_path=str(etdump)).to_dataframe()

    # Rows are call sites; ``raw`` holds one time (ms) per execution: [prefill, step 1, ...].
    step_total = [0.0] * steps
    delegate_calls, delegate_ms = 0, [0.0] * steps
    xnn = defaultdict(lambda: [0, [0.0] * steps])
    portable = defaultdict(lambda: [0, [0.0] * steps])
    for row in frame[frame.event_block_name == "Execute"].itertuples():
        times = list(row.raw)[1 : 1 + steps]
        if len(times) != steps:
            continue
        name = row.event_name
        if row.is_delegated_op:
            kind = re.sub(r"\s*#\d+$", "", name)
            bucket = xnn[kind]
        elif name == "DELEGATE_CALL":
            delegate_calls += 1
            delegate_ms = [a + b for a, b in zip(delegate_ms, times, strict=True)]
            step_total = [a + b for a, b in zip(step_total, times, strict=True)]
            continue
        elif name == "OPERATOR_CALL":
            step_total = [a + b for a, b in zip(step_total, times, strict=True)]
            continue
        elif name.startswith("native_call_"):
            bucket = portable[name.removeprefix("native_call_")]
        else:
            continue
        bucket[0] += 1
        bucket[1] = [a + b for a, b in zip(bucket[1], times, strict=True)]

    def table(d: dict) -> dict:
        rows = {k: {"count": c, "ms": _median(t)} for k, (c, t) in d.items()}
        return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"]))

    portable_rows = table(portable)
    return {
        "step_ms": _median(step_total),
        "delegate_calls": delegate_calls,
        "delegate_ms": _median(delegate_ms),
        "portable_ops": sum(r["count"] for r in portable_rows.values()),
        "portable_ms": _median(step_total) - _median(delegate_ms),
        "xnnpack_ops": sum(c for c, _ in xnn.values()),
        "xnnpack": table(xnn),
        "portable": portable_rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("exports", nargs="+", type=Path, help="export directories (with manifest)")
    p.add_argument("--steps", type=int, default=32, help="decode steps to profile")
    p.add_argument("--top", type=int, default=6, help="rows of each table to print")
    p.add_argument("--json", type=Path, default=None, help="write the full profile here")
    ns = p.parse_args()

    from edgelora._quiet import quiet_third_party
    from edgelora.format.adapter_inputs import load_adapter_tensors, program_inputs
    from edgelora.format.manifest import read_export

    quiet_third_party()
    results = {}
    for export in ns.exports:
        manifest = read_export(export)
        for name in manifest.programs:
            key = f"{export.name}/{name}"
            results[key] = profile_program(
                export / f"{name}.pte", export / "foundation.ptd", ns.steps
            )
            _print(key, results[key], ns.top)
        sw = manifest.switchable
        if sw is not None and sw.adapters:  # with its first adapter's inputs
            name, file = next(iter(sw.adapters.items()))
            stored, dtype = sw.input_dtypes
            extra = program_inputs(
                load_adapter_tensors(export / file, sw.slots, stored), sw.slots, stored, dtype
            )
            key = f"{export.name}/{sw.file} ({name} inputs)"
            results[key] = profile_program(
                export / sw.file, export / sw.foundation, ns.steps, extra
            )
            _print(key, results[key], ns.top)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(results, indent=2) + "\n")


def _print(key: str, prof: dict, top: int) -> None:
    print(
        f"{key}: {prof['step_ms']:.3f} ms/step = delegates {prof['delegate_ms']:.3f} ms "
        f"({prof['delegate_calls']} calls, {prof['xnnpack_ops']} XNNPACK ops) + "
        f"outside {prof['portable_ms']:.3f} ms ({prof['portable_ops']} portable ops)"
    )
    for title, rows in (("XNNPACK", prof["xnnpack"]), ("portable", prof["portable"])):
        for op, r in list(rows.items())[:top]:
            print(f"    {title:8s} {r['ms']:8.3f} ms  x{r['count']:<4d} {op}")


if __name__ == "__main__":
    sys.exit(main())
