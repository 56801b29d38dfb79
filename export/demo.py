"""``edgelora-demo``: the main job on an embedded default, end to end, with figures.

Builds a tiny deterministic Llama and a demo LoRA adapter (PEFT layout), exports base + adapter
(8da4w, group 32) into one foundation.ptd, runs both programs on the ExecuTorch runtime, and
prints sizes, stage times, speed and the output match against the eager models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgelora._quiet import quiet_third_party

DEMO_PARAMS = {
    "dim": 128,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,
    "multiple_of": 32,
    "max_seq_len": 96,
}
PROMPT = [1, 17, 42, 99, 7, 256, 3, 88]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgelora-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write the export (default: a temporary directory)",
    )
    ns = p.parse_args(argv)
    quiet_third_party()

    from edgelora.ci.output_match import match_export
    from edgelora.export.config import ExportConfig
    from edgelora.export.pipeline import run_export
    from edgelora.models.adapter_files import load_adapter, save_peft_adapter
    from edgelora.models.adapters import random_adapter
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.runtime.session import LlamaProgram

    work = Path(tempfile.mkdtemp(prefix="edgelora-demo-"))
    out = ns.output_dir or work / "out"
    args = ModelArgs.from_dict(DEMO_PARAMS)
    print(
        f"model: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
        f"({args.kv_heads} kv), vocab {args.vocab_size}; demo adapter: rank 16 on all 7 projections"
    )
    demo = random_adapter(build_model(args), "demo", rank=16, alpha=32, seed=1)
    adapter = load_adapter(save_peft_adapter(demo, work / "demo_adapter", args), args, "demo")
    config = ExportConfig(
        model_args=args,
        output_dir=out,
        qmode="8da4w",
        group_size=32,
        embedding_bits=4,
        embedding_group_size=32,
        overwrite=True,
    )
    result = run_export(config, [adapter])

    print("\nfiles:")
    for name, entry in result.manifest["files"].items():
        print(f"  {name:16s} {entry['size'] / 1024:9.1f} KiB")
    print(f"  (adapter weights: {adapter.num_bytes / 1024:.1f} KiB fp32)")
    print("\nruntime (ExecuTorch, XNNPACK):")
    for name in ("base", "demo"):
        gen = LlamaProgram(out / f"{name}.pte", out / "foundation.ptd").generate(PROMPT, 24)
        print(
            f"  {name:5s} prefill {len(PROMPT)} tokens: {gen.prefill_tokens_per_s:8.0f} tokens/s, "
            f"decode {gen.decode_ms_per_token:.3f} ms/token; tokens {gen.tokens[:10]}..."
        )
    print("\noutput match (runtime vs eager):")
    results = match_export(out)
    for r in results:
        print(f"  {r.line()}")
    print(f"\nexport written to {out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
