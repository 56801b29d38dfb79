"""``export_llama``: a Llama model plus LoRA adapters -> ``.pte`` programs + one ``foundation.ptd``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import ConfigError, EdgeLoraError
from edgelora.export.config import AdapterSpec, ExportConfig, FoundationSpec, parse_switchable_slots
from edgelora.export.parser import HF_DEFAULT_MAX_SEQ_LEN, build_parser
from edgelora.export.tokenizer import end_of_turn_eos, find_chat_template
from edgelora.models.args import ModelArgs
from edgelora.weights.checkpoint import Checkpoint, open_checkpoint


def resolve_model_args(
    params_path: Path | None, checkpoint: Checkpoint | None, max_seq_len: int | None
) -> ModelArgs:
    """``--params`` if given, else the config found beside the checkpoint."""
    if params_path is not None:
        return ModelArgs.from_json(params_path, max_seq_len=max_seq_len)
    if checkpoint is None or checkpoint.params is None:
        raise ConfigError(
            "--params is required unless --checkpoint is a Hugging Face directory "
            "(config.json) or a Meta directory (params.json)"
        )
    params = dict(checkpoint.params)
    if max_seq_len is not None:
        params["max_seq_len"] = max_seq_len
    elif checkpoint.layout == "hf" and params.get("max_seq_len", 0) > HF_DEFAULT_MAX_SEQ_LEN:
        params["max_seq_len"] = HF_DEFAULT_MAX_SEQ_LEN
    source = str(checkpoint.path / "config.json" if checkpoint.path.is_dir() else checkpoint.path)
    return ModelArgs.from_dict(params, source=source)


def config_from_args(
    ns: argparse.Namespace, args: ModelArgs, checkpoint: Checkpoint | None = None
) -> ExportConfig:
    special = {} if checkpoint is None else checkpoint.special_tokens
    tokenizer = (ns.tokenizer,) if ns.tokenizer is not None else ()
    if ns.tokenizer is None and checkpoint is not None:
        tokenizer = tuple(checkpoint.tokenizer_files)
    for path in tokenizer:
        if not path.is_file():
            raise ConfigError(f"{path}: tokenizer file not found")
    template, template_source = find_chat_template(ns.chat_template, checkpoint, tokenizer)
    eos_ids = ns.eos_id or special.get("eos_ids", [2])
    if not ns.eos_id and template is not None:
        eos_ids = end_of_turn_eos(eos_ids, template, tokenizer)
    return ExportConfig(
        bos_id=ns.bos_id if ns.bos_id is not None else special.get("bos_id", 1),
        eos_ids=tuple(eos_ids),
        tokenizer_files=tokenizer,
        chat_template=template,
        chat_template_source=template_source,
        model_args=args,
        output_dir=ns.output_dir,
        foundation=FoundationSpec.resolve(
            ns.recipe,
            qmode=ns.qmode,
            group_size=ns.group_size,
            qparams=ns.qparams,
            embedding_bits=ns.embedding_bits,
            embedding_group_size=ns.embedding_group_size,
            output_bits=ns.output_bits,
            checkpoint=ns.checkpoint,
            calibration=ns.calibration,
            seed=ns.seed,
            dtype=ns.dtype,
            fuse=ns.fuse,
            sdpa=ns.sdpa,
            logits=ns.logits,
        ),
        adapters=tuple(AdapterSpec.parse(s) for s in ns.lora),
        overwrite=ns.overwrite,
        merge=ns.merge,
        bundle=ns.bundle,
        switchable=ns.switchable,
        adapter_template=ns.adapter_template,
        adapter_dtype=ns.adapter_dtype,
        switchable_slots=None
        if ns.switchable_slots is None
        else parse_switchable_slots(ns.switchable_slots),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    quiet_third_party()
    try:
        if ns.add_to is not None:  # the alias of edgelora-add / edgelora-remove
            from edgelora.export.verbs import update_from_export_flags

            update_from_export_flags(ns, parser, argv)
            return 0
        if ns.remove:
            raise ConfigError("--remove NAME needs --add-to OUT (the export to remove it from)")
        if ns.output_dir is None:
            raise ConfigError("--output-dir is required (or --add-to OUT to update an export)")
        from edgelora.export.pipeline import run_export
        from edgelora.weights.adapter_files import load_adapter

        checkpoint = None
        if ns.checkpoint is not None:
            if not ns.checkpoint.exists():
                raise EdgeLoraError(f"{ns.checkpoint}: checkpoint not found")
            checkpoint = open_checkpoint(ns.checkpoint)
            print(f"checkpoint {ns.checkpoint}: {checkpoint.layout} layout, {checkpoint.dtype}")
            for note in checkpoint.notes:
                print(f"  {note}")
        args = resolve_model_args(ns.params, checkpoint, ns.max_seq_len)
        config = config_from_args(ns, args, checkpoint)
        # Read every adapter before the long steps, so a bad one fails in seconds.
        adapters = [
            load_adapter(a.path, config.model_args, a.name, scale=a.scale) for a in config.adapters
        ]
        run_export(config, adapters, checkpoint=checkpoint)
    except EdgeLoraError as e:
        print(f"export_llama: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
