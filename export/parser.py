"""``export_llama``'s flags: the parser, its help groups and epilog (``export/cli.py`` maps the
parsed flags onto an :class:`~edgelora.export.config.ExportConfig`). Every default shown is
the :class:`~edgelora.export.spec.FoundationSpec`'s (``spec_default``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgelora.export.spec import spec_default
from edgelora.quant.recipe import DEFAULT_RECIPE, PRESETS, QMODES, QPARAMS, preset

HF_DEFAULT_MAX_SEQ_LEN = 2048

EPILOG = """\
output (in --output-dir):
  base.pte         the base model's program (with --merge NAME: NAME.pte, the merged model)
  <NAME>.pte       one program per --lora adapter (adapter weights inside)
  foundation.ptd   every non-adapter constant; shared by all the programs above
  manifest.json    model config, quantization, special tokens, each file's size and sha256,
                   and which foundation each program needs
  tokenizer.json   the checkpoint's tokenizer (and tokenizer_config.json), when it has one

checkpoints (--checkpoint):
  a Hugging Face directory of Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 (text), SmolLM3,
  Granite, Phi-3/Phi-4-mini or dense DeepSeek-V3 (config.json + model.safetensors, sharded
  safetensors with model.safetensors.index.json, or pytorch_model.bin), a Meta directory (params.json +
  consolidated.00.pth), or one .safetensors/.pth file in Meta/ExecuTorch or torchtune key
  names (then --params is required). .pth/.bin files are read with weights_only=True.

adapters (--lora):
  a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors or .bin) or a
  torchtune one (adapter_config.json + adapter_model.pt). Config fields the tool cannot honour
  (use_dora, modules_to_save, lm_head/embedding targets, ...) are errors, never ignored.

examples:
  export_llama --checkpoint hf-model/ --lora chat=adapters/chat \\
      --lora code=adapters/code:scale=0.5 --output-dir out/
  export_llama --params params.json --lora chat=adapters/chat --merge chat --output-dir merged/
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
        default=None,
        help="Meta-style params.json (dim, n_layers, n_heads, n_kv_heads, "
        "vocab_size, multiple_of/ffn_dim_multiplier or hidden_dim, norm_eps, "
        "rope_theta, max_seq_len). Required unless --checkpoint is a Hugging Face or "
        "Meta directory, whose config.json/params.json is used",
    )
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="model weights: a Hugging Face or Meta directory, or a .safetensors/.pth "
        "file (see 'checkpoints' below). Without it the weights are deterministic "
        "random values from --seed",
    )
    model.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default=spec_default("dtype"),
        help="compute dtype of the exported model; bf16/fp16 checkpoints are "
        "upcast to fp32 unless this says otherwise (default %(default)s). bf16 is not offered: "
        "XNNPACK does not delegate bf16 linears",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=spec_default("seed"),
        help="seed of the random weights when no --checkpoint is given (default %(default)s)",
    )
    model.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="KV-cache length: longest prompt + generation (default: params.json's "
        f"max_seq_len, else 128; for Hugging Face models max_position_embeddings capped "
        f"at {HF_DEFAULT_MAX_SEQ_LEN})",
    )
    lora = p.add_argument_group("adapters")
    lora.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[NAME=]DIR[:scale=S]",
        help="a PEFT or torchtune LoRA adapter directory; writes NAME.pte (NAME "
        "defaults to the directory name). ':scale=S' multiplies the adapter's "
        "contribution (like llama.cpp's --lora-scaled). Repeat for several adapters",
    )
    lora.add_argument(
        "--merge",
        metavar="NAME",
        default=None,
        help="fold the --lora adapter NAME into the base weights before "
        "quantization: a single-adapter deployment with no LoRA cost at run time. "
        "Writes NAME.pte (no base.pte) and foundation.ptd holding the merged weights",
    )
    progs = p.add_argument_group("programs (what is written, and how it runs)")
    progs.add_argument(
        "--fuse",
        choices=["none", "qkv", "gate_up", "mla", "all"],
        default=spec_default("fuse"),
        help="run projections that share an input as one matmul: q/k/v (qkv), "
        "gate/up (gate_up), an MLA model's wq_a/wkv_a as wq_kv_a (mla), or every one "
        "the model has (all). Adapters on the pieces are packed onto the fused layer; "
        "all programs still share one foundation.ptd. A checkpoint in the other MLA "
        "layout is converted (default %(default)s: split, or the model config's "
        "fused_mla_lora_proj)",
    )
    progs.add_argument(
        "--sdpa",
        choices=["custom", "plain"],
        default=spec_default("sdpa"),
        help="attention kernels: ExecuTorch's custom ops (llama::update_cache writes the KV "
        "cache in place, llama::custom_sdpa; the runtime process must load "
        "executorch.extension.llm.custom_ops) or plain PyTorch ops (portable; every "
        "decode step copies the cache). MLA models always use plain (default %(default)s)",
    )
    progs.add_argument(
        "--logits",
        choices=["all", "last"],
        default=spec_default("logits"),
        help="what forward returns: logits for every position of the input (all: what output "
        "matching and evaluation need) or for the last one only (last: what a generating app "
        "reads, as ExecuTorch's example exports by default; the output layer then runs on one "
        "row, so prefill is faster) (default %(default)s)",
    )
    progs.add_argument(
        "--bundle",
        action="store_true",
        help="also write bundle.pte: one program whose methods are base and each --lora "
        "adapter, sharing foundation.ptd, so an app loads the foundation once and switches "
        "adapters by method (edgelora.runtime.session.AdapterSession)",
    )
    progs.add_argument(
        "--switchable",
        action="store_true",
        help="also write switchable.pte: ONE program forward(tokens, input_pos, lora) whose "
        "adapter weights are run-time inputs, and <adapter>.lora.safetensors with each "
        "adapter's inputs; a process loads the foundation (and XNNPACK packs it) once and "
        "switches adapters by passing other tensors (AdapterSession, edgelora-run --adapters)",
    )
    progs.add_argument(
        "--switchable-slots",
        default=None,
        metavar="TARGETS:RANK",
        help="with --switchable: give switchable.pte room for adapters that do not exist yet -- "
        "a slot on every projection TARGETS names (all, or a comma list such as q_proj,v_proj) "
        "of every layer, of rank at least RANK (e.g. all:32). Without it the slots are the "
        "union of the --lora adapters given now; --add-to refuses an adapter that does not fit",
    )
    progs.add_argument(
        "--adapter-template",
        action="store_true",
        help="with --switchable: also write template.pte, a lowered program with switchable."
        "pte's slots as constants. --add-to OUT --lora NAME=DIR (no model arguments) then also "
        "makes NAME.pte from it in seconds by replacing its adapter bytes -- no checkpoint, no "
        "lowering -- a program as fast as a lowered adapter program (its weights are packed "
        "once, at load, not on every call as switchable.pte's inputs are). Costs one more "
        "lowering now",
    )
    progs.add_argument(
        "--adapter-dtype",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="adapter weights' dtype. Switchable inputs (NAME.lora.safetensors): fp32, fp16 "
        "(half the bytes) or int8 with one fp32 scale per rank component (a quarter); "
        "switchable.pte takes them in the compute dtype, converted once when a process "
        "switches, so decode speed does not depend on it. Adapter programs (NAME.pte): fp16 "
        "stores lora_A/lora_B in fp16 (half the file bytes; XNNPACK widens them to fp32 when "
        "it loads the program, so not faster), int8 as int8 weights under fp32 activations "
        "(XNNPACK's F32-QC8W linear: a quarter of the bytes in the file and per token, the "
        "fastest adapter programs; lora_B per rank component with one shared scale, so the "
        "scales take a few KB); neither applies to bundle.pte (default: the compute dtype)",
    )
    quant = p.add_argument_group(
        "quantization",
        "A recipe (--recipe) sets every field below; a flag given beside it overrides that "
        "field. Presets (measured on a real model: README, bench/quality.py): "
        + "; ".join(f"{n}: {r.summary}" for n, r in PRESETS.items()),
    )
    quant.add_argument(
        "--recipe",
        choices=sorted(PRESETS),
        default=spec_default("recipe"),
        help="quantization preset (default %(default)s: the least KL divergence at "
        "llama.cpp Q4_K_M's bytes, measured)",
    )
    quant.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE",
        help="UTF-8 text the calibrating recipes (q4_k_s, q4_k_m) measure the model on (GPTQ "
        "rounding, per-tensor sensitivity), one passage per line; its first 1024 tokens are "
        "used (default: prose of the Python Language Reference that Python installs, "
        "pydoc_data.topics)",
    )
    quant.add_argument(
        "--qmode",
        choices=list(QMODES),
        default=None,
        help="linear precision: int8 dynamic activations with int4 grouped (8da4w) or int8 "
        "per-channel (8da8w) weights, int8 per-channel weights under fp32 activations (8w), or "
        "none (float). LoRA matrices always stay float (default: the recipe's)",
    )
    quant.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="8da4w weight group size along in_features, a multiple of 32; 0 = one scale per "
        "output channel. Linears it does not divide stay float and are listed (default: the "
        "recipe's, 32)",
    )
    quant.add_argument(
        "--qparams",
        choices=QPARAMS,
        default=None,
        help="how 8da4w weight scales are chosen without GPTQ: from each group's max |w| "
        "(affine) or by torchao's HQQ scale-only search (hqq) (default: the recipe's; "
        f"{preset(DEFAULT_RECIPE).qparams} in {DEFAULT_RECIPE})",
    )
    quant.add_argument(
        "--output-bits",
        type=int,
        choices=[0, 8],
        default=None,
        help="8: the output layer int8 per output channel with int8 activations (8da8w); 0: as "
        "the other linears (default: the recipe's output precision)",
    )
    quant.add_argument(
        "--embedding-bits",
        type=int,
        choices=[0, 4, 8],
        default=None,
        help="token-embedding weight-only quantization bits; 0 keeps it float (the "
        "checkpoint's bf16/fp16, else fp32) (default: the recipe's)",
    )
    quant.add_argument(
        "--embedding-group-size",
        type=int,
        default=None,
        help="embedding quantization group size; 0 = per row (default: the recipe's)",
    )
    tok = p.add_argument_group("tokenizer and special tokens")
    tok.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Hugging Face tokenizer.json to ship with the export (default: the checkpoint "
        "directory's tokenizer.json and tokenizer_config.json, if any); checked with "
        "ExecuTorch's own parser at export time",
    )
    tok.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Jinja chat template to ship as chat_template.jinja (default: the checkpoint's "
        "chat_template.jinja, else tokenizer_config.json's chat_template); edgelora-chat and "
        "edgelora-run --chat render it. The special tokens it writes that end a turn "
        "(<|im_end|>, <end_of_turn>, <|eot_id|>...) join the EOS ids",
    )
    tok.add_argument(
        "--bos-id",
        type=int,
        default=None,
        help="the id the runner prepends (default: the checkpoint's bos_token_id from "
        "generation_config.json / config.json, else 1)",
    )
    tok.add_argument(
        "--eos-id",
        type=int,
        action="append",
        default=None,
        help="an id that ends generation; repeat for several (default: the checkpoint's "
        "eos_token_id, all of them if it is a list, else 2)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="directory to write (required unless --add-to); files are staged in a temporary "
        "directory beside it and swapped into place only when every program succeeded (a kill "
        "at any moment leaves the old export or the new one). One export or "
        "update writes a directory at a time (the lock file .NAME.lock beside it)",
    )
    upd = p.add_argument_group("updating an export (adapters added later)")
    upd.add_argument(
        "--add-to",
        type=Path,
        default=None,
        metavar="OUT",
        help="add the --lora adapters to the existing export OUT, leaving its foundation.ptd and "
        "every other file as they are. Quantization and model settings come from OUT's "
        "manifest (a flag that disagrees is refused). Without model arguments, writes "
        "NAME.lora.safetensors for OUT's switchable.pte in seconds (no checkpoint, no "
        "lowering); with OUT's --checkpoint (or --params and --seed) also NAME.pte, checked "
        "to need exactly the foundation.ptd that is there",
    )
    upd.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="NAME",
        help="with --add-to OUT: remove adapter NAME (its program and switchable inputs) from "
        "OUT. Repeatable",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory even if it holds a different "
        "model's export (or other files)",
    )
    return p
