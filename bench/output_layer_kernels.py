"""One decode step of SmolLM2-135M's output layer (576 -> 49152, one token) per weight format,
on the ExecuTorch runtime, from memory as decode reads it.

    python bench/output_layer_kernels.py [--threads 1] [--copies 6] [--rounds 5]
                                         [--json bench/results/output-layer-kernels.json]

Each format (``8w``: int8 weights under fp32 activations, XNNPACK's F32-QC8W; ``8da8w``: int8
dynamic activations, QD8-F32-QC8W; ``8da4w`` g32: QD8-F32-QB4W) is lowered as our exports lower
it (:func:`~edgelora.backends.xnnpack.lower.lower_to_xnnpack`), ``--copies`` programs with other
random weights called round-robin so each call reads its weights from memory, not from a cache
the previous call warmed (6 x 28 MB here, past any cache); a figure is the median of 108 calls,
then the median over rounds. One thread count per process (the runtime's pool is sized before
programs are loaded); the JSON keeps the other counts' rows. Bytes over time against the streaming bandwidth a torch sum gets
says whether a format is held back by its bytes or by its kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

IN, OUT = 576, 49152
QMODES = {"8w": 0, "8da8w": 0, "8da4w": 32}  # qmode -> group size


def programs(qmode: str, copies: int, work: Path) -> list:
    from executorch.runtime import Runtime

    from edgelora.backends.xnnpack.lower import lower_to_xnnpack
    from edgelora.quant.linear import quantize_linears

    out = []
    for c in range(copies):
        torch.manual_seed(c)
        m = nn.Sequential(nn.Linear(IN, OUT, bias=False))
        quantize_linears(m, qmode, QMODES[qmode], qparams="affine")
        ep = torch.export.export(m, (torch.randn(1, 1, IN),))
        d = work / f"{qmode}-{c}"
        d.mkdir()
        low = lower_to_xnnpack(ep, is_adapter=lambda n: False)
        low.write_pte(d / "p.pte")
        data = low.write_data_files(d)
        prog = Runtime.get().load_program(d / "p.pte", data_path=data[0] if data else None)
        out.append((prog, prog.load_method("forward"), sum(f.stat().st_size for f in data)))
    return out


def bandwidth() -> float:
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    t = []
    for _ in range(5):
        s = time.perf_counter()
        x.sum()
        t.append(time.perf_counter() - s)
    return x.numel() * 4 / statistics.median(t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    from edgelora.runtime.native import native_output, set_threads

    rows: dict[str, dict] = {}
    if ns.json is not None and ns.json.is_file():
        rows = json.loads(ns.json.read_text())["rows"]
    for threads in (ns.threads,):
        torch.set_num_threads(threads)
        gbps = bandwidth()
        with native_output(None), tempfile.TemporaryDirectory() as work:
            set_threads(threads)  # (resizes the pool of programs loaded after it)
            progs = {q: programs(q, ns.copies, Path(work)) for q in QMODES}
            x = [torch.randn(1, 1, IN)]
            times: dict[str, list[float]] = {q: [] for q in QMODES}
            for _ in range(ns.rounds):
                for q, ps in progs.items():
                    t = []
                    for i in range(120):
                        method = ps[i % len(ps)][1]
                        s = time.perf_counter()
                        method.execute(x)
                        t.append(time.perf_counter() - s)
                    times[q].append(statistics.median(t[12:]))
        for q, ts in times.items():
            sec = statistics.median(ts)
            mb = progs[q][0][2] / 1e6
            rows[f"{q} {threads}t"] = {
                "us": 1e6 * sec,
                "weight_mb": mb,
                "gb_per_s": mb / 1e3 / sec,
                "streaming_gb_per_s": gbps,
            }
            print(f"{threads} thread(s) {q:6s}: {1e6 * sec:7.0f} us, {mb:.1f} MB, "
                  f"{mb / 1e3 / sec:.1f} GB/s (a torch sum streams {gbps:.1f})", flush=True)  # fmt: skip
    if ns.json is not None:
        ns.json.write_text(json.dumps({"shape": [IN, OUT], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
