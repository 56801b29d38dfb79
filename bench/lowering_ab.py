"""Lowering time of one program, this checkout against another (e.g. the commit before a
change), in alternating rounds (this VM's timings vary by up to 30% between processes).

    python bench/lowering_ab.py --baseline-root DIR [--shape llama-3.2-1b] [--layers 4]
                                [--adapter] [--rounds 2] [--json OUT.json]

``DIR`` holds the other checkout as a folder named ``edgelora`` (e.g. ``git worktree add
DIR/edgelora <commit>``). Each round builds the model in a fresh process with that code (8da4w
g32, custom SDPA, last-position logits, random weights), traces it, and times
``torch.export`` and the lowering + serialisation of the base program (or, with
``--adapter``, of a rank-16 adapter program on all seven projections).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = r"""
import io, json, sys, time
from edgelora.bench.lowering_profile import profile_model  # the same model as the profile, with this code
from edgelora.backends.xnnpack.lower import lower_to_xnnpack
from edgelora.export.programs import trace
from edgelora.lora.attach import adapter_attached, adapter_fqns
model, args, adapter = profile_model({shape!r}, {layers}, {adapter})
with adapter_attached(model, adapter):
    t0 = time.perf_counter()
    ep = trace(model, args)
    t1 = time.perf_counter()
    low = lower_to_xnnpack(ep, is_adapter=adapter_fqns(model).__contains__)
    low.manager.write_to_file(io.BytesIO())
    t2 = time.perf_counter()
print("RESULT " + json.dumps({{"trace_s": t1 - t0, "lower_s": t2 - t1}}))
"""


def _round(root: str | None, ns) -> dict:
    env = dict(os.environ)
    if root:
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = _CHILD.format(shape=ns.shape, layers=ns.layers, adapter=ns.adapter)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/"
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"round failed ({root or 'this checkout'}):\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-root", required=True)
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--adapter", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
    for i in range(ns.rounds):
        for name, root in (("baseline", ns.baseline_root), ("ours", None)):
            runs[name].append(_round(root, ns))
            print(f"round {i + 1} {name}: {runs[name][-1]}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    speedup = med["baseline"]["lower_s"] / med["ours"]["lower_s"]
    print(f"lowering median: baseline {med['baseline']['lower_s']:.1f} s, ours "
          f"{med['ours']['lower_s']:.1f} s ({speedup:.2f}x faster); trace "
          f"{med['baseline']['trace_s']:.1f} s vs {med['ours']['trace_s']:.1f} s")  # fmt: skip
    if ns.json:
        ns.json.write_text(json.dumps({"args": vars(ns) | {"json": str(ns.json)}, "runs": runs,
                                       "median": med, "speedup": speedup}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
