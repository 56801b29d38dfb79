"""``export_llama``: a Llama model plus LoRA adapters -> ``.pte`` programs + one ``foundation.ptd``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import EdgeLoraError
from edgelora.export.config import AdapterSpec, ExportConfig
from edgelora.models.args import ModelArgs

EPILOG = """\
output (in --output-dir):
  base.pte         the base model's program
  <NAME>.pte       one program per --lora adapter (adapter weights inside)
  foundation.ptd   every non-adapter constant; shared by all the programs above
  manifest.json    model config, quantization, each file's size and sha256, and which
                   foundation each program needs

example:
  export_llama --params params.json --lora chat=adapters/chat --lora code=adapters/code \\
      --qmode 8da4w --group-size 32 --output-dir out/
  edgelora-run out/chat.pte --data out/foundation.ptd --prompt-ids 1,2,3
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_llama",
        description=(
            "Export a Llama model and any number of LoRA adapters to ExecuTorch programs for "
            "XNNPACK, with the (quantized) base weights stored once in foundation.ptd."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument(
        "--params",
        type=Path,
        required=True,
        help="Meta-style params.json (dim, n_layers, n_heads, n_kv_heads, "
        "vocab_size, multiple_of/ffn_dim_multiplier or hidden_dim, norm_eps, "
        "rope_theta, max_seq_len)",
    )
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="state dict in this tool's layout (layers.N.attention.wq.weight, ...) "
        "as .safetensors or .pth (read with weights_only=True). Without it "
        "the weights are deterministic random values from --seed",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random weights when no --checkpoint is given (default 0)",
    )
    model.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="KV-cache length: longest prompt + generation (default: params.json's "
        "max_seq_len, else 128)",
    )
    lora = p.add_argument_group("adapters")
    lora.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors); writes NAME.pte (NAME defaults to the "
        "directory name). Repeat for several adapters",
    )
    quant = p.add_argument_group("quantization")
    quant.add_argument(
        "--qmode",
        choices=["none", "8da4w", "8da8w"],
        default="8da4w",
        help="linear quantization: int8 dynamic activations with int4 (8da4w) or "
        "int8 (8da8w) weights, or none (fp32). LoRA matrices always stay "
        "float (default 8da4w)",
    )
    quant.add_argument(
        "--group-size",
        type=int,
        default=32,
        help="weight quantization group size along in_features; 0 = one scale "
        "per output channel. Linears it does not divide stay float and are "
        "listed (default 32)",
    )
    quant.add_argument(
        "--embedding-bits",
        type=int,
        choices=[0, 4, 8],
        default=0,
        help="token-embedding weight-only quantization bits; 0 keeps it fp32 (default 0)",
    )
    quant.add_argument(
        "--embedding-group-size",
        type=int,
        default=32,
        help="embedding quantization group size; 0 = per row (default 32)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="directory to write; files are staged in a temporary directory and "
        "moved into place only when every program succeeded",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory even if it holds a different "
        "model's export (or other files)",
    )
    return p


def config_from_args(ns: argparse.Namespace) -> ExportConfig:
    args = ModelArgs.from_json(ns.params, max_seq_len=ns.max_seq_len)
    return ExportConfig(
        model_args=args,
        output_dir=ns.output_dir,
        checkpoint=ns.checkpoint,
        adapters=tuple(AdapterSpec.parse(s) for s in ns.lora),
        qmode=ns.qmode,
        group_size=ns.group_size,
        embedding_bits=ns.embedding_bits,
        embedding_group_size=ns.embedding_group_size,
        seed=ns.seed,
        overwrite=ns.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        from edgelora.export.pipeline import run_export
        from edgelora.models.adapters import load_peft_adapter

        config = config_from_args(ns)
        if config.checkpoint is not None and not config.checkpoint.is_file():
            raise EdgeLoraError(f"{config.checkpoint}: checkpoint file not found")
        # Read every adapter before the long steps, so a bad one fails in seconds.
        adapters = [load_peft_adapter(a.path, a.name) for a in config.adapters]
        run_export(config, adapters)
    except EdgeLoraError as e:
        print(f"export_llama: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
