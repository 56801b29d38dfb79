"""Adapter switching in one process: resident memory and switch latency.

    python bench/switch.py --bundle OUT/bundle.pte --data OUT/foundation.ptd \\
        [--programs OUT/base.pte OUT/chat.pte ... [--programs-data PTD]] [--json OUT.json]

Loads the bundle's ``base`` method and then each adapter method, recording the process RSS
after each (the first forward included, so XNNPACK has packed its weights), the time of the
first switch to a method (``load_method``) and of switching back to an already-loaded one.
``--programs`` loads separate ``.pte`` programs with the same data file in the same way, for
comparison. Each part runs in its own subprocess so the RSS figures do not mix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _child(kind: str, data: str, paths: list[str]) -> dict:
    import time

    import psutil
    import torch

    from edgelora.runtime.program import register_kernels

    register_kernels()
    from executorch.runtime import Runtime

    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731
    start = rss()
    inputs = [torch.tensor([[1, 2, 3]]), torch.tensor([0])]
    steps, loaded = [], []
    if kind == "bundle":
        program = Runtime.get().load_program(paths[0], data_path=data)
        methods = [m for m in ("base",) + tuple(sorted(program.method_names)) if m not in loaded]
        methods = [
            m for m in dict.fromkeys(methods) if not m.startswith(("get_", "use_", "enable_"))
        ]
        for name in methods:
            t = time.perf_counter()
            method = program.load_method(name)
            first = time.perf_counter() - t
            method.execute(inputs)
            loaded.append(method)
            steps.append({"loaded": name, "first_switch_ms": first * 1e3, "rss_mib": rss() - start})
        t = time.perf_counter()
        for method in loaded:  # switching between loaded methods: pick another handle
            method.execute(inputs)
        cached = (time.perf_counter() - t) / len(loaded)
        return {"steps": steps, "forward_after_switch_ms": cached * 1e3}
    for path in paths:
        t = time.perf_counter()
        program = Runtime.get().load_program(path, data_path=data)
        method = program.load_method("forward")
        first = time.perf_counter() - t
        method.execute(inputs)
        loaded.append((program, method))
        steps.append(
            {"loaded": Path(path).name, "first_switch_ms": first * 1e3, "rss_mib": rss() - start}
        )
    return {"steps": steps}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], sys.argv[4:])))
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--programs", type=Path, nargs="*", default=[])
    p.add_argument("--programs-data", type=Path, default=None, help="their data file (--data)")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()

    def run(kind: str, paths: list[Path], data: Path) -> dict:
        cmd = [sys.executable, __file__, "--child", kind, str(data), *map(str, paths)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    figures = {"bundle": run("bundle", [ns.bundle], ns.data)}
    if ns.programs:
        data = ns.programs_data or ns.data
        figures["separate_programs"] = run("programs", ns.programs, data)
    text = json.dumps(figures, indent=2)
    print(text)
    if ns.json:
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
