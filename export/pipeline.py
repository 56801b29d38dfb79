"""The export pipeline behind ``export_llama``.

1. Validate inputs: params, checkpoint and every adapter are read and checked before any long step.
2. Build the model from ``params`` (deterministic random weights from ``seed``), load the
   checkpoint, if any (HF, Meta or torchtune layout), fold the ``--merge`` adapter into the base
   weights, and cast to ``--dtype``.
3. Quantize the foundation once: token embedding (optional) and linears (8da4w / 8da8w, LoRA
   matrices excluded by FQN).
4. For the base and then each adapter: attach the adapter as ``LoRALinear`` wrappers around the
   shared quantized linears, ``torch.export`` with a dynamic sequence length, lower to XNNPACK
   with foundation constants tagged for ``foundation.ptd``, then detach the adapter again.
5. Check every adapter program's foundation data is byte-identical to the base's, so one
   ``foundation.ptd`` serves them all.
6. Write ``base.pte``, ``<adapter>.pte``, ``foundation.ptd`` and ``manifest.json`` into a staging
   directory and move it into place (no partial output on failure).
"""

from __future__ import annotations

import filecmp
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import ConfigError
from edgelora.export.config import ExportConfig
from edgelora.export.output import (
    FOUNDATION_FILE,
    check_output_dir,
    commit_output,
    file_entry,
    write_manifest,
)
from edgelora.export.timing import StageTimer
from edgelora.models.adapters import (
    Adapter,
    adapter_attached,
    is_adapter_fqn,
    merge_adapter,
)
from edgelora.models.args import ModelArgs
from edgelora.models.checkpoint import Checkpoint, load_checkpoint
from edgelora.models.llama import Transformer, build_model
from edgelora.quant.embedding import EmbeddingReport, quantize_embedding
from edgelora.quant.linear import QuantReport, quantize_linears
from edgelora.runtime.session import (
    FOUNDATION_SHA_METHOD,
    PROGRAM_SHA_METHOD,
    RUNNER_METADATA_METHODS,
)


def build_foundation(
    args: ModelArgs,
    *,
    checkpoint: str | Path | Checkpoint | None,
    seed: int,
    qmode: str,
    group_size: int,
    embedding_bits: int = 0,
    embedding_group_size: int = 0,
    merge: Adapter | None = None,
    dtype: torch.dtype = torch.float32,
    fuse: str = "none",
    log: Callable[[str], None] | None = None,
) -> tuple[Transformer, QuantReport, EmbeddingReport]:
    """Steps 2-3: the (quantized) base model every program of an export shares.

    Deterministic: the same arguments give bit-identical weights, so tests and CI can rebuild
    the eager reference of an exported program. ``merge`` is folded in (in fp32) before the
    cast to ``dtype`` and quantization.
    """
    model = build_model(args, seed=seed)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, log=log)
    if merge is not None:
        merge_adapter(model, merge)
    apply_fusion(model, fuse)
    if dtype != torch.float32:
        model.to(dtype)
    emb_report = quantize_embedding(model, embedding_bits, embedding_group_size)
    report = quantize_linears(model, qmode, group_size)
    return model, report, emb_report


# Peak export memory per byte of fp32 model state, measured here: the fp32 weights, their
# quantized copies, and torch.export/lowering's working set (stories15M: ~0.95 GB peak for
# 0.10 GB of fp32 state incl. the embedding; 1.3 GB for stories110M's 0.45 GB).
EXPORT_MEMORY_FACTOR = 3.0
_FIXED_OVERHEAD = 600 * 2**20  # torch + executorch + torchao imported, tracing machinery


def estimate_export_memory(args: ModelArgs) -> tuple[int, int]:
    """``(state_bytes, estimated_peak_bytes)``: the model's fp32 parameters and buffers
    (counted on the meta device, nothing allocated) and the export's estimated peak RSS."""
    with torch.device("meta"):
        model = Transformer(args)
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return state, int(state * EXPORT_MEMORY_FACTOR + _FIXED_OVERHEAD)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_memory(args: ModelArgs, available: int | None = None) -> int:
    """Fail early (:class:`ConfigError` with the estimate) if the export cannot fit in memory,
    rather than being killed half-way; returns the estimated peak in bytes."""
    state, peak = estimate_export_memory(args)
    available = available_memory() if available is None else available
    if available is not None and peak > available:
        raise ConfigError(
            f"this model needs about {peak / 2**30:.1f} GiB to export ({state / 4 / 1e6:,.0f}M "
            f"fp32 values = {state / 2**30:.2f} GiB of weights and buffers, x"
            f"{EXPORT_MEMORY_FACTOR:g} while quantizing and lowering); only "
            f"{available / 2**30:.1f} GiB is available"
        )
    return peak


def apply_fusion(model: Transformer, fuse: str) -> None:
    """``--fuse``: fuse Q/K/V (``qkv``), gate/up (``gate_up``), MLA's wq_a/wkv_a (``mla``) or
    all that the model has (``all``) in place (the split weights are freed). Q/K/V and gate/up
    not named are split, whatever layout the checkpoint had; MLA not named keeps the layout its
    config asks for (``fused_mla_lora_proj``)."""
    args = model.args
    if not args.is_mla:
        if fuse in ("qkv", "all"):
            model.fuse_qkv_projections(inplace=True)
        else:
            model.unfuse_qkv_projections()
    elif args.q_lora_rank and fuse in ("mla", "all"):
        model.fuse_mla_projections(inplace=True)
    if fuse in ("gate_up", "all"):
        model.fuse_gate_up_projections(inplace=True)
    else:
        model.unfuse_gate_up_projections()


def example_inputs(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    # Two tokens, not one: a length-1 example would let export specialise the sequence dim.
    return torch.tensor([[1, 2]], dtype=torch.long), torch.tensor([0], dtype=torch.long)


def export_program(
    model: nn.Module, args: ModelArgs, *, extra_inputs: list[torch.Tensor] | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``forward(tokens [1, seq], input_pos [1])`` with dynamic ``seq``;
    with ``extra_inputs``, of ``forward(tokens, input_pos, extra_inputs)`` (static shapes)."""
    # max_seq_len - 1, as ExecuTorch's example does: with the full length the symbolic shape
    # solver emits a guard (seq != max_seq_len) that contradicts the range.
    seq = torch.export.Dim("seq", min=1, max=args.max_seq_len - 1)
    with torch.no_grad():
        inputs, dynamic = example_inputs(args), ({1: seq}, None)
        if extra_inputs is not None:
            inputs, dynamic = (*inputs, extra_inputs), (*dynamic, [None] * len(extra_inputs))
        ep = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
        return ep.run_decompositions({})


# The program's own record of the foundation it needs: a constant method returning the
# foundation.ptd's sha256 as 32 bytes. The bytes are not known when a program is lowered (the
# foundation is written with the first program), so programs are serialised with this
# placeholder and patched once the foundation exists (:func:`_stamp_foundation_sha`).
_SHA_PLACEHOLDER = hashlib.sha256(b"edgelora: foundation sha256 placeholder").digest()
# And its own checksum: the sha256 of the .pte with these 32 bytes zeroed
# (edgelora.runtime.session.verify_program), so a corrupted program is refused, not run.
_SELF_PLACEHOLDER = hashlib.sha256(b"edgelora: program sha256 placeholder").digest()


def program_methods(args: ModelArgs) -> dict[str, object]:
    """Every constant method of our programs: the runner's metadata and the foundation sha."""
    methods = runner_metadata(args)
    placeholder = torch.frombuffer(bytearray(_SHA_PLACEHOLDER), dtype=torch.uint8)
    methods[FOUNDATION_SHA_METHOD] = placeholder
    methods[PROGRAM_SHA_METHOD] = torch.frombuffer(bytearray(_SELF_PLACEHOLDER), dtype=torch.uint8)
    return methods


def _stamp_foundation_sha(pte: Path, foundation_sha: str) -> None:
    """Write the foundation's sha256, then the program's own checksum, over their placeholders
    in ``pte`` (each must occur exactly once: a constant tensor's bytes)."""
    data = pte.read_bytes()
    for placeholder in (_SHA_PLACEHOLDER, _SELF_PLACEHOLDER):
        if data.count(placeholder) != 1:
            raise RuntimeError(
                f"internal error: {pte.name} holds a checksum placeholder "
                f"{data.count(placeholder)} times, expected once"
            )
    data = data.replace(_SHA_PLACEHOLDER, bytes.fromhex(foundation_sha))
    own = hashlib.sha256(data.replace(_SELF_PLACEHOLDER, bytes(32))).digest()
    pte.write_bytes(data.replace(_SELF_PLACEHOLDER, own))


def runner_metadata(args: ModelArgs, *, bos_id: int = 1, eos_id: int = 2) -> dict[str, object]:
    """Constant methods ExecuTorch's LLM runner reads from a program."""
    meta = {
        "get_max_seq_len": args.max_seq_len,
        "get_max_context_len": args.max_seq_len,
        "get_vocab_size": args.vocab_size,
        "get_n_layers": args.n_layers,
        "get_bos_id": bos_id,
        "get_eos_ids": [eos_id],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    assert tuple(meta) == RUNNER_METADATA_METHODS  # what LlamaProgram reads back
    return meta


@dataclass
class ExportResult:
    output_dir: Path
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict)


def run_export(
    config: ExportConfig,
    adapters: list[Adapter],
    *,
    checkpoint: Checkpoint | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Run the pipeline for an already-validated ``config`` and loaded ``adapters``.

    ``checkpoint`` is ``config.checkpoint`` already opened (to avoid reading it twice).
    """

    timer = StageTimer(log)
    args = config.model_args
    out_dir = config.output_dir
    check_output_dir(out_dir, overwrite=config.overwrite)
    peak = check_memory(args)
    log(f"  estimated peak memory {peak / 2**30:.2f} GiB")
    merged = next((a for a in adapters if a.name == config.merge), None)
    adapters = [a for a in adapters if a is not merged]
    for adapter in [merged, *adapters]:
        for note in [] if adapter is None else adapter.notes:
            log(f"  adapter {adapter.name}: {note}")

    with timer("build + quantize foundation"):
        model, qreport, ereport = build_foundation(
            args,
            checkpoint=checkpoint if checkpoint is not None else config.checkpoint,
            seed=config.seed,
            qmode=config.qmode,
            group_size=config.group_size,
            embedding_bits=config.embedding_bits,
            embedding_group_size=config.embedding_group_size,
            merge=merged,
            dtype=config.torch_dtype,
            fuse=config.fuse,
            log=log,
        )
    model.last_logits_only = config.logits == "last"
    if config.sdpa == "custom":
        model.use_custom_ops()
        if args.is_mla:
            log("  attention: MLA keeps the plain PyTorch SDPA path (custom_sdpa needs v = k size)")
        else:
            log("  attention: ExecuTorch custom ops (llama::update_cache, llama::custom_sdpa)")
    if merged is not None:
        log(f"  merged adapter {merged.name} into the base weights (scale {merged.scale:g})")
    for line in [ereport.summary_line(), *qreport.summary_lines()]:
        log(f"  {line}")
    # Fit every adapter to the model now, so a bad one fails before the first long export.
    for adapter in adapters:
        with adapter_attached(model, adapter):
            pass

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        stage = Path(tmp) / "stage"
        scratch = Path(tmp) / "scratch"
        stage.mkdir()
        scratch.mkdir()
        programs: dict[str, dict] = {}
        base_derived = None  # pass-made constants the base program put in the foundation
        for adapter in [None, *adapters]:
            name = "base" if adapter is None else adapter.name
            if adapter is None and merged is not None:
                name = merged.name  # the merged model's program carries the adapter's name
            with adapter_attached(model, adapter):
                with timer(f"{name}: torch.export"):
                    ep = export_program(model, args)
                lowered = _lower_and_write(
                    ep, args, stage, scratch, f"{name}.pte", name, timer, base_derived
                )
            if adapter is None:
                base_derived = lowered.derived_foundation
            programs[name] = {
                "file": f"{name}.pte",
                "foundation": FOUNDATION_FILE,
                "adapter": None if adapter is None else _adapter_entry(adapter),
                "merged_adapter": (
                    _adapter_entry(merged) if adapter is None and merged is not None else None
                ),
                "adapter_constants": sorted(lowered.split.adapter),
                # adapter tensors byte-identical to a foundation tensor: one key, served
                # by foundation.ptd (a key lives in exactly one file)
                "adapter_constants_in_foundation": sorted(lowered.split.shared),
            }
            log(f"  {name}.pte: {(stage / f'{name}.pte').stat().st_size / 1e6:.3f} MB")

        bundle = switchable = None
        if config.bundle and adapters:
            bundle = _export_bundle(model, args, adapters, stage, scratch, timer, log, base_derived)
        if config.switchable and adapters:
            switchable = _export_switchable(
                model,
                args,
                adapters,
                config.torch_dtype,
                stage,
                scratch,
                timer,
                log,
                base_derived,
            )

        with timer("write manifest + move into place"):
            foundation_sha = file_entry(stage / FOUNDATION_FILE)["sha256"]
            for pte in stage.glob("*.pte"):
                _stamp_foundation_sha(pte, foundation_sha)
            files = {p.name: file_entry(p) for p in sorted(stage.iterdir())}
            for prog in programs.values():
                prog["foundation_sha256"] = foundation_sha
            manifest = {
                "format": "edgelora-export/1",
                "model": args.to_dict(),
                "quantization": {
                    "qmode": config.qmode,
                    "group_size": config.group_size,
                    "embedding_bits": config.embedding_bits,
                    "embedding_group_size": config.embedding_group_size,
                    "quantized_linears": len(qreport.quantized),
                    "float_linears": {d.fqn: d.reason for d in qreport.kept_float},
                    "max_weight_abs_err": qreport.max_abs_err,
                },
                "seed": config.seed,
                "dtype": config.dtype,
                "fuse": config.fuse,
                "sdpa": config.sdpa,
                "logits": config.logits,
                "checkpoint": None if config.checkpoint is None else str(config.checkpoint),
                "checkpoint_layout": None if checkpoint is None else checkpoint.layout,
                "programs": programs,
                "bundle": bundle,
                "switchable": switchable,
                "files": files,
            }
            write_manifest(stage, manifest)
            commit_output(stage, out_dir, foundation_sha, overwrite=config.overwrite)
    log(f"wrote {out_dir}: " + ", ".join(f"{n} {e['size'] / 1e6:.3f} MB" for n, e in files.items()))
    return ExportResult(out_dir, manifest, timer.durations)


BUNDLE_FILE = "bundle.pte"


def _check_foundation(written: list[Path], stage: Path, name: str, *, compare: bool) -> None:
    """The lowering of ``name`` wrote exactly ``foundation.ptd`` and (``compare``) the same
    bytes as the base program's, so every program shares one foundation."""
    if [p.name for p in written] != [FOUNDATION_FILE]:
        raise ConfigError(
            f"{name}: expected the lowering to write only {FOUNDATION_FILE}, got "
            f"{[p.name for p in written]}"
        )
    if compare and not filecmp.cmp(written[0], stage / FOUNDATION_FILE, shallow=False):
        raise RuntimeError(
            f"internal error: the foundation written for {name!r} differs from the base "
            "program's; programs would not share one foundation.ptd"
        )


def _lower_and_write(
    eps, args, stage: Path, scratch: Path, file: str, label: str, timer, base_derived
):
    """Lower ``eps`` (one program, or method name -> program) and write ``stage/file``.

    ``base_derived`` is ``None`` for the base program, which writes ``stage/foundation.ptd``;
    any other program gets the base's ``derived_foundation`` and must write the same
    foundation bytes (checked). Returns the lowered program."""
    from edgelora.backends.xnnpack.lower import lower_to_xnnpack

    with timer(f"{label}: lower to XNNPACK + serialise"):
        lowered = lower_to_xnnpack(
            eps,
            is_adapter=is_adapter_fqn,
            constant_methods=program_methods(args),
            foundation_derived=base_derived,
        )
        lowered.write_pte(stage / file)
        data_dir = stage if base_derived is None else scratch / label
        data_dir.mkdir(exist_ok=True)
        written = lowered.write_data_files(data_dir)
    _check_foundation(written, stage, label, compare=base_derived is not None)
    return lowered


def _export_bundle(model, args, adapters, stage, scratch, timer, log, base_derived) -> dict:
    """``--bundle``: one multi-method program, ``base`` plus one method per adapter, whose
    methods share the foundation's keys; an app loads the program (and the foundation) once
    and switches adapters by method."""
    methods = {}
    for adapter in [None, *adapters]:
        name = "base" if adapter is None else adapter.name
        with adapter_attached(model, adapter), timer(f"bundle {name}: torch.export"):
            methods[name] = export_program(model, args)
    _lower_and_write(methods, args, stage, scratch, BUNDLE_FILE, "bundle", timer, base_derived)
    log(
        f"  {BUNDLE_FILE}: {(stage / BUNDLE_FILE).stat().st_size / 1e6:.3f} MB, methods "
        f"{', '.join(methods)}"
    )
    return {"file": BUNDLE_FILE, "foundation": FOUNDATION_FILE, "methods": list(methods)}


SWITCHABLE_FILE = "switchable.pte"


def _export_switchable(
    model, args, adapters, dtype, stage, scratch, timer, log, base_derived
) -> dict:
    """``--switchable``: one program ``forward(tokens, input_pos, lora)`` whose adapter weights
    are run-time inputs (:mod:`edgelora.models.lora_inputs`), and each adapter's inputs as
    ``<name>.lora.safetensors``. The program holds no adapter constant: all of it is the
    foundation, packed once however many adapters a process switches between."""
    from edgelora.models.lora_inputs import (
        adapter_slots,
        adapter_tensors,
        save_adapter_tensors,
        switchable,
    )

    slots = adapter_slots(model, adapters)
    files = {}
    for adapter in adapters:
        files[adapter.name] = f"{adapter.name}.lora.safetensors"
        tensors = adapter_tensors(model, adapter, slots, dtype)
        save_adapter_tensors(stage / files[adapter.name], tensors, slots)
    example = adapter_tensors(model, None, slots, dtype)
    with switchable(model, slots), timer("switchable: torch.export"):
        ep = export_program(model, args, extra_inputs=example)
    _lower_and_write(ep, args, stage, scratch, SWITCHABLE_FILE, "switchable", timer, base_derived)
    log(
        f"  {SWITCHABLE_FILE}: {(stage / SWITCHABLE_FILE).stat().st_size / 1e6:.3f} MB, "
        f"{len(slots)} adapter slots; adapter inputs "
        + ", ".join(f"{f} {(stage / f).stat().st_size / 1e6:.3f} MB" for f in files.values())
    )
    return {
        "file": SWITCHABLE_FILE,
        "foundation": FOUNDATION_FILE,
        "slots": [s.to_dict() for s in slots],
        "dtype": str(dtype).removeprefix("torch."),
        "adapters": files,
    }


def _adapter_entry(adapter: Adapter) -> dict:
    ranks = sorted({w.rank for w in adapter.modules.values()})
    return {
        "source": adapter.source,
        "scale": adapter.scale,
        "ranks": ranks,
        "modules": sorted(adapter.modules),
        "bytes_fp32": adapter.num_bytes,
    }
