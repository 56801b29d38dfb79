"""Fused vs split projections, base and with a rank-16 all-projection adapter, in one run.

``python bench/fuse.py [--config stories15m] [--json bench/results/fuse-stories15m.json]``
exports the same random model (8da4w g32) twice -- ``--fuse none`` and ``--fuse all`` (or the
``--fuse`` given, e.g. ``mla``) -- each with base + one adapter, then measures decode ms/token
(median over 64 steps after warm-up) and prefill tokens/s (128-token prompt), alternating the
four programs over several rounds so machine drift cancels, and prints the ratios.
``--sdpa plain|custom`` picks the attention kernels of both exports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgelora.bench.common import CONFIGS  # noqa: E402


def compare(config: str, variants: dict[str, dict], rounds: int) -> dict:
    """Export ``variants`` (name -> ExportConfig keyword overrides) of ``config``, each with
    base + a rank-16 adapter on every projection, and measure all programs alternately."""
    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    from edgelora.export.config import ExportConfig, FoundationSpec
    from edgelora.export.pipeline import run_export
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.runtime.program import LlamaProgram
    from edgelora.weights.synthetic import random_adapter

    work = Path(tempfile.mkdtemp(prefix="edgelora-bench-"))
    args = ModelArgs.from_dict(CONFIGS[config])
    adapter = random_adapter(build_model(args), "lora", rank=16, alpha=32, seed=10)
    exports = {}
    for variant, overrides in variants.items():
        spec = FoundationSpec.resolve(qmode="8da4w", group_size=32, **overrides)
        cfg = ExportConfig(args, work / variant, foundation=spec)
        t0 = time.perf_counter()
        run_export(cfg, [adapter], log=lambda s: None)
        exports[variant] = time.perf_counter() - t0
        print(f"export {variant} {overrides}: {exports[variant]:.1f} s", flush=True)
    programs = {
        f"{variant}/{name}": LlamaProgram(
            work / variant / f"{name}.pte", work / variant / "foundation.ptd"
        )
        for variant in variants
        for name in ("base", "lora")
    }
    prompt = [(7 * i) % (args.vocab_size - 3) + 3 for i in range(128)]
    decode = {k: [] for k in programs}
    prefill = {k: [] for k in programs}
    for _ in range(rounds):  # alternate A/B so drift cancels
        for key, prog in programs.items():
            t = time.perf_counter()
            prog.forward(prompt, 0)
            prefill[key].append(128 / (time.perf_counter() - t))
            decode[key].append(prog.generate([1, 2, 3, 4], 65).decode_ms_per_token)
    return {
        "config": config,
        "work_dir": str(work),
        "variants": variants,
        "export_s": exports,
        "decode_ms_per_token": {k: statistics.median(v) for k, v in decode.items()},
        "prefill_128_tokens_per_s": {k: statistics.median(v) for k, v in prefill.items()},
    }


def write(figures: dict, path: Path | None) -> None:
    text = json.dumps(figures, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="stories15m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--fuse", default="all", help="the fused variant's --fuse mode (e.g. mla for MLA)"
    )
    p.add_argument("--sdpa", default="plain", choices=["plain", "custom"])
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    f = ns.fuse
    figures = compare(
        ns.config,
        {"none": {"fuse": "none", "sdpa": ns.sdpa}, f: {"fuse": f, "sdpa": ns.sdpa}},
        ns.rounds,
    )
    d = figures["decode_ms_per_token"]
    figures["ratios"] = {
        "split_lora_over_split_base": d["none/lora"] / d["none/base"],
        "fused_lora_over_fused_base": d[f"{f}/lora"] / d[f"{f}/base"],
        "split_base_over_fused_base": d["none/base"] / d[f"{f}/base"],
        "split_lora_over_fused_lora": d["none/lora"] / d[f"{f}/lora"],
    }
    write(figures, ns.json)


if __name__ == "__main__":
    main()
