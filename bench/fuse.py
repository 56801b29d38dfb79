"""Fused vs split projections, base and with a rank-16 all-projection adapter, in one run.

``python bench/fuse.py [--config stories15m] [--json bench/results/fuse-stories15m.json]``
exports the same random model (8da4w g32) twice -- ``--fuse none`` and ``--fuse all`` (or the
``--fuse`` given, e.g. ``mla``) -- each with
base + one adapter, then measures decode ms/token (median over 64 steps after warm-up) and
prefill tokens/s (128-token prompt), alternating the four programs over several rounds so
machine drift cancels, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine import CONFIGS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="stories15m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--fuse", default="all", help="the fused variant's --fuse mode (e.g. mla for MLA)"
    )
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()

    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    from edgelora.export.config import ExportConfig
    from edgelora.export.pipeline import run_export
    from edgelora.models.adapters import random_adapter
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.runtime.session import LlamaProgram

    work = Path(tempfile.mkdtemp(prefix="edgelora-fuse-"))
    args = ModelArgs.from_dict(CONFIGS[ns.config])
    adapter = random_adapter(build_model(args), "lora", rank=16, alpha=32, seed=10)
    exports = {}
    modes = ("none", ns.fuse)
    for fuse in modes:
        config = ExportConfig(args, work / fuse, qmode="8da4w", group_size=32, fuse=fuse)
        t0 = time.perf_counter()
        run_export(config, [adapter], log=lambda s: None)
        exports[fuse] = time.perf_counter() - t0
        print(f"export --fuse {fuse}: {exports[fuse]:.1f} s", flush=True)
    programs = {
        f"{fuse}/{name}": LlamaProgram(work / fuse / f"{name}.pte", work / fuse / "foundation.ptd")
        for fuse in modes
        for name in ("base", "lora")
    }
    prompt = [(7 * i) % (args.vocab_size - 3) + 3 for i in range(128)]
    decode = {k: [] for k in programs}
    prefill = {k: [] for k in programs}
    for _ in range(ns.rounds):  # alternate A/B so drift cancels
        for key, prog in programs.items():
            t = time.perf_counter()
            prog.forward(prompt, 0)
            prefill[key].append(128 / (time.perf_counter() - t))
            decode[key].append(prog.generate([1, 2, 3, 4], 65).decode_ms_per_token)
    figures = {
        "config": ns.config,
        "export_s": exports,
        "decode_ms_per_token": {k: statistics.median(v) for k, v in decode.items()},
        "prefill_128_tokens_per_s": {k: statistics.median(v) for k, v in prefill.items()},
    }
    d, f = figures["decode_ms_per_token"], ns.fuse
    figures["ratios"] = {
        "split_lora_over_split_base": d["none/lora"] / d["none/base"],
        "fused_lora_over_fused_base": d[f"{f}/lora"] / d[f"{f}/base"],
        "split_base_over_fused_base": d["none/base"] / d[f"{f}/base"],
        "split_lora_over_fused_lora": d["none/lora"] / d[f"{f}/lora"],
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
