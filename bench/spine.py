"""Export-spine figures on a stories15M-sized config: stage times, file sizes, speed, output match.

    python bench/spine.py [--config stories15m|tiny] [--work DIR] [--json OUT.json]

Exports the base and two rank-16 adapters on all seven projections (8da4w, group 32), then
runs every program on the ExecuTorch runtime (prefill of a 32- and a 128-token prompt, decode
median ms/token over 64 steps) and matches outputs against the eager models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgelora.bench.common import CONFIGS


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="stories15m")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--embedding-bits", type=int, default=0)
    ns = p.parse_args()

    from edgelora.ci.output_match import match_export
    from edgelora.export.config import ExportConfig, FoundationSpec
    from edgelora.export.pipeline import run_export
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.runtime.program import LlamaProgram
    from edgelora.weights.synthetic import random_peft_adapter

    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(CONFIGS[ns.config])
    model = build_model(args)
    adapters = []
    for i, name in enumerate(("chat", "code")):
        path = work / "adapters" / name
        adapters.append(
            random_peft_adapter(model, path, args, name, rank=16, alpha=32, seed=10 + i)
        )
    config = ExportConfig(
        model_args=args,
        output_dir=work / "out",
        foundation=FoundationSpec.resolve(
            qmode="8da4w", group_size=32, embedding_bits=ns.embedding_bits
        ),
        overwrite=True,
    )
    t0 = time.perf_counter()
    result = run_export(config, adapters)
    export_s = time.perf_counter() - t0

    figures = {
        "config": ns.config,
        "model": args.to_dict(),
        "export_total_s": export_s,
        "stages_s": result.timings,
        "files": result.manifest.to_json()["files"],
        "adapter_weight_bytes_fp32": {a.name: a.num_bytes for a in adapters},
        "runs": {},
    }
    out = work / "out"
    for name in ("base", "chat", "code"):
        prog = LlamaProgram(out / f"{name}.pte", out / "foundation.ptd")
        row = {}
        for n in (32, 128):
            prompt = [(7 * i) % (args.vocab_size - 3) + 3 for i in range(n)]
            times = []
            for _ in range(5):
                t = time.perf_counter()
                prog.forward(prompt, 0)
                times.append(time.perf_counter() - t)
            row[f"prefill_{n}_tokens_per_s"] = n / statistics.median(times)
        gen = prog.generate([1, 2, 3, 4], 65)
        row["decode_ms_per_token"] = gen.decode_ms_per_token
        figures["runs"][name] = row
    figures["output_match"] = [
        {
            "name": r.name,
            "max_abs_diff": r.max_abs_diff,
            "rel": r.rel_diff,
            "agreement": r.token_agreement,
            "vs_base": r.diff_from_base,
            "ok": r.ok,
        }
        for r in match_export(out)
    ]
    text = json.dumps(figures, indent=2)
    print(text)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
