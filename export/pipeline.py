"""The export pipeline behind ``export_llama``, in the order the code runs it.

1. **Check** the output directory, the tokenizer (with ExecuTorch's own parser) and the memory
   estimate before any long step (params, checkpoint and adapters were read and validated by
   the caller).
2. **Build the foundation** (:func:`~edgelora.export.foundation.build_foundation`): the model
   with its traced settings (attention kernels, logits), the checkpoint (or seeded random
   weights), the ``--merge`` adapter folded in, ``--fuse``, ``--dtype``, then the embedding and
   linears quantized once (LoRA matrices excluded). Every adapter is fitted to it now, so a bad
   one fails in seconds.
3. **Base and adapter programs**: for the base and then each adapter, attach the adapter as
   wrappers around the shared quantized layers, ``torch.export`` with a dynamic sequence
   length, lower to XNNPACK with every non-adapter constant tagged for ``foundation.ptd``, and
   detach it again. Each program's foundation must equal the base's byte for byte.
4. **Bundle, switchable and template programs** (``--bundle``, ``--switchable``,
   ``--adapter-template``), by the same writer.
5. **Stamp and commit**: write the foundation's sha256 and each program's own checksum into
   every ``.pte`` (then find the template's weights in it, :mod:`edgelora.format.template`),
   write ``manifest.json`` (the tokenizer files were copied beside the programs), fsync the
   stage and swap it with ``OUT`` in one step (:func:`edgelora.export.output.commit_output`: no
   partial output on failure, never a moment without a complete ``OUT``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgelora.export.config import ExportConfig
from edgelora.export.foundation import build_foundation
from edgelora.export.memory import check_memory
from edgelora.export.output import check_output_dir, commit_output, export_lock, staging_prefix
from edgelora.export.programs import (
    ProgramWriter,
    write_adapter_inputs,
    write_program,
    write_template,
)
from edgelora.export.timing import StageTimer
from edgelora.format.chat_template import CHAT_TEMPLATE_FILE
from edgelora.format.checksums import stamp_program
from edgelora.format.layout import (
    BASE_PROGRAM,
    BUNDLE_FILE,
    FOUNDATION_FILE,
    SWITCHABLE_FILE,
    TEMPLATE_FILE,
    adapter_inputs_file,
)
from edgelora.format.manifest import (
    BundleEntry,
    FileEntry,
    Manifest,
    ProgramEntry,
    QuantizationEntry,
    SwitchableEntry,
)
from edgelora.format.template import locate_template
from edgelora.lora.attach import adapter_attached, adapter_fqns
from edgelora.lora.record import Adapter
from edgelora.lora.slots import adapter_slots, adapter_tensors, switchable
from edgelora.models.llama import Transformer
from edgelora.quant.embedding import EmbeddingReport
from edgelora.quant.linear import QuantReport
from edgelora.weights.checkpoint import Checkpoint, checkpoint_digest
from edgelora.weights.synthetic import reservation_adapter


@dataclass
class ExportResult:
    output_dir: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


def run_export(
    config: ExportConfig,
    adapters: list[Adapter],
    *,
    checkpoint: Checkpoint | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Run the pipeline for an already-validated ``config`` and loaded ``adapters``
    (``checkpoint`` is ``config.checkpoint`` already opened, to avoid reading it twice)."""
    with export_lock(config.output_dir, log=log) as out_dir:
        return _run_export(config, adapters, checkpoint, log, out_dir)


def _run_export(
    config: ExportConfig,
    adapters: list[Adapter],
    checkpoint: Checkpoint | None,
    log: Callable[[str], None],
    out_dir: Path,
) -> ExportResult:
    timer = StageTimer(log)
    args = config.model_args
    merged = next((a for a in adapters if a.name == config.merge), None)
    adapters = [a for a in adapters if a is not merged]

    # 1. Check.
    check_output_dir(out_dir, overwrite=config.overwrite)
    tokenizer = _check_tokenizer(config)
    spec = config.foundation
    estimate = check_memory(
        args,
        qmode=spec.qmode,
        group_size=spec.group_size,
        embedding_bits=spec.embedding_bits,
        embedding_group_size=spec.embedding_group_size,
        dtype_bytes=spec.torch_dtype.itemsize,
        checkpoint_dtype_bytes=4 if checkpoint is None else checkpoint.dtype.itemsize,
        calibrated=spec.calibrated,
    )
    log(f"  estimated peak memory {estimate.summary()}")
    log(f"  recipe {spec.recipe.name}: {spec.recipe.describe()}")
    for adapter in [a for a in (merged, *adapters) if a is not None]:
        for note in adapter.notes:
            log(f"  adapter {adapter.name}: {note}")

    # 2. Build the foundation.
    with timer("build + quantize foundation"):
        model, qreport, ereport = build_foundation(
            args, config.foundation, checkpoint=checkpoint, merge=merged, log=log
        )
    _log_foundation(model, merged, qreport, ereport, log)
    for adapter in adapters:
        with adapter_attached(model, adapter):
            pass

    with _staging(out_dir) as (stage, scratch):
        writer = ProgramWriter(
            stage, scratch, args, timer, bos_id=config.bos_id, eos_ids=config.eos_ids
        )
        _ship_tokenizer(config, stage, tokenizer, log)
        # 3. Base and adapter programs.
        programs = {}
        program_dtype = config.adapter_dtype if config.adapter_dtype in ("int8", "fp16") else ""
        for adapter in [None, *adapters]:
            name, entry = write_program(writer, model, adapter, merged, program_dtype)
            programs[name] = entry
            log(f"  {entry.file}: {writer.size_mb(entry.file):.3f} MB")
        # 4. Bundle and switchable programs.
        bundle = switch = None
        if config.bundle and adapters:
            if program_dtype:
                log(
                    f"  bundle.pte keeps fp32 adapter weights (--adapter-dtype {program_dtype}: "
                    "NAME.pte only)"
                )
            bundle = _write_bundle(writer, model, adapters, log)
        fill = None
        if config.switchable and (adapters or config.switchable_slots):
            switch = _write_switchable(writer, model, adapters, config, log)
            if config.adapter_template:
                fill = write_template(writer, model, switch.slots, config.torch_dtype)
                log(f"  {TEMPLATE_FILE}: {writer.size_mb(TEMPLATE_FILE):.3f} MB")
        # 5. Stamp and commit.
        with timer("write manifest + move into place"):
            foundation_sha = FileEntry.of(stage / FOUNDATION_FILE).sha256
            for pte in stage.glob("*.pte"):
                stamp_program(pte, foundation_sha)
            if fill is not None:
                template = locate_template(stage / TEMPLATE_FILE, switch.slots, fill)
                switch = replace(switch, template=template)
            programs = {
                n: ProgramEntry(**{**vars(p), "foundation_sha256": foundation_sha})
                for n, p in programs.items()
            }
            manifest = Manifest(
                model=args.to_dict(),
                quantization=_quantization_entry(config, qreport),
                programs=programs,
                files={p.name: FileEntry.of(p) for p in sorted(stage.iterdir())},
                **spec.manifest_settings(),
                checkpoint_layout=None if checkpoint is None else checkpoint.layout,
                checkpoint_sha256=None
                if config.checkpoint is None
                else checkpoint_digest(config.checkpoint),
                bundle=bundle,
                switchable=switch,
                bos_id=config.bos_id,
                eos_ids=list(config.eos_ids),
                tokenizer=tokenizer,
                chat_template=None if config.chat_template is None else CHAT_TEMPLATE_FILE,
            )
            manifest.write(stage)
            commit_output(stage, out_dir, foundation_sha, overwrite=config.overwrite)
    sizes = ", ".join(f"{n} {e.size / 1e6:.3f} MB" for n, e in manifest.files.items())
    log(f"wrote {out_dir}: {sizes}")
    return ExportResult(out_dir, manifest, timer.durations)


def _quantization_entry(config: ExportConfig, qreport: QuantReport) -> QuantizationEntry:
    """What the manifest records of the foundation's quantization: the recipe, and each
    linear's qmode and relative weight error (and its measured sensitivity, if calibrated)."""
    calibration = qreport.calibration
    return config.foundation.quantization_entry(
        calibration_sha256=None if calibration is None else calibration.sha256,
        tensors={f: [m, round(e, 6)] for f, (m, e) in qreport.tensors.items()},
        sensitivity={f: round(v, 6) for f, v in qreport.sensitivity.items()},
        quantized_linears=len(qreport.quantized),
        float_linears={d.fqn: d.reason for d in qreport.kept_float},
        max_weight_abs_err=qreport.max_abs_err,
    )


def _log_foundation(
    model: Transformer,
    merged: Adapter | None,
    qreport: QuantReport,
    ereport: EmbeddingReport,
    log: Callable[[str], None],
) -> None:
    if model.args.is_mla:
        log("  attention: MLA keeps the plain PyTorch SDPA path (custom_sdpa needs v = k size)")
    else:
        kinds: dict[tuple[str, bool], int] = {}
        for i, layer in enumerate(model.layers):
            key = (layer.kind, model.uses_custom_sdpa(i))
            kinds[key] = kinds.get(key, 0) + 1
        for (kind, custom), n in kinds.items():
            how = (
                "ExecuTorch custom ops (llama::update_cache, llama::custom_sdpa)"
                if custom
                else "plain PyTorch SDPA"
                + (" (sliding window)" if kind == "sliding" else "")
                + (" (soft-capped scores)" if model.args.attn_logit_softcap else "")
            )
            log(f"  attention, {n} {kind} layer(s): {how}")
    if merged is not None:
        log(f"  merged adapter {merged.name} into the base weights (scale {merged.scale:g})")
    for line in [ereport.summary_line(), *qreport.summary_lines()]:
        log(f"  {line}")
    # every linear's precision and error (and sensitivity, when measured): the log says what
    # the recipe decided, tensor by tensor
    for fqn, (qmode, err) in qreport.tensors.items():
        kld = qreport.sensitivity.get(fqn)
        log(
            f"    {fqn}: {qmode}, max rel weight err {err:.4f}"
            + ("" if kld is None else f", KLD alone at 4 bits {kld:.5f}")
        )


@contextmanager
def _staging(out_dir: Path):
    """``(stage, scratch)`` in a temporary directory beside ``out_dir`` (same file system, so
    the commit is a rename), removed on exit whatever happened."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=staging_prefix(out_dir)) as tmp:
        stage, scratch = Path(tmp) / "stage", Path(tmp) / "scratch"
        stage.mkdir()
        scratch.mkdir()
        yield stage, scratch


def _check_tokenizer(config: ExportConfig) -> str | None:
    """The name of the ``tokenizer.json`` the export ships (``None``: none), checked with
    ExecuTorch's own parser before any long step."""
    from edgelora.export.tokenizer import check_chat_template, check_tokenizer

    shipped = None
    for path in config.tokenizer_files:
        if path.name.endswith(".json") and path.name != "tokenizer_config.json":
            check_tokenizer(path, config.model_args.vocab_size)
            shipped = shipped or path.name
    if config.chat_template is not None:
        check_chat_template(
            config.chat_template,
            config.chat_template_source or "chat template",
            config.tokenizer_files,
        )
    return shipped


def _ship_tokenizer(config: ExportConfig, stage: Path, shipped: str | None, log) -> None:
    """Copy the tokenizer files into the export, and write its chat template."""
    for path in config.tokenizer_files:
        shutil.copyfile(path, stage / path.name)
    if config.chat_template is not None:
        (stage / CHAT_TEMPLATE_FILE).write_text(config.chat_template, encoding="utf-8")
        log(f"  chat template {CHAT_TEMPLATE_FILE} (from {config.chat_template_source})")
    if shipped:
        log(
            f"  tokenizer {shipped} (checked with ExecuTorch's parser), bos {config.bos_id}, "
            f"eos {list(config.eos_ids)}"
        )


def _write_bundle(
    writer: ProgramWriter, model: Transformer, adapters: list[Adapter], log
) -> BundleEntry:
    """``bundle.pte``: the base plus one method per adapter, sharing the foundation's keys; an
    app loads the program (and the foundation) once and switches adapters by method."""
    methods, adapter_constants = {}, set()
    for adapter in [None, *adapters]:
        name = BASE_PROGRAM if adapter is None else adapter.name
        with adapter_attached(model, adapter):
            methods[name] = writer.trace(model, f"bundle {name}")
            adapter_constants |= adapter_fqns(model)
    writer.write(BUNDLE_FILE, methods, is_adapter=adapter_constants.__contains__, label="bundle")
    log(f"  {BUNDLE_FILE}: {writer.size_mb(BUNDLE_FILE):.3f} MB, methods {', '.join(methods)}")
    return BundleEntry(file=BUNDLE_FILE, methods=list(methods))


def _write_switchable(
    writer: ProgramWriter, model: Transformer, adapters: list[Adapter], config: ExportConfig, log
) -> SwitchableEntry:
    """``switchable.pte``: one program ``forward(tokens, input_pos, lora)`` whose adapter
    weights are run-time inputs (:mod:`edgelora.lora.slots`), and each adapter's inputs as
    ``NAME.lora.safetensors``. The program holds no adapter constant: all of it is the
    foundation, packed once however many adapters a process switches between."""
    torch_dtype = config.adapter_torch_dtype
    reserved = []
    if config.switchable_slots is not None:  # room for adapters made later
        targets, rank = config.switchable_slots
        reserved.append(reservation_adapter(model.args, targets, rank))
    slots = adapter_slots(model, [*reserved, *adapters])
    files = {}
    for adapter in adapters:
        files[adapter.name] = adapter_inputs_file(adapter.name)
        write_adapter_inputs(model, adapter, slots, torch_dtype, writer.stage / files[adapter.name])
    # The program takes its inputs in the compute dtype: a process converts an adapter's
    # stored tensors once, when it switches (format/adapter_inputs.program_inputs).
    program_dtype = config.torch_dtype
    example = adapter_tensors(model, None, slots, program_dtype)
    with switchable(model, slots, program_dtype) as program:
        ep = writer.trace(program, "switchable", extra_inputs=example)
    writer.write(SWITCHABLE_FILE, ep, is_adapter=lambda fqn: False, label="switchable")
    log(
        f"  {SWITCHABLE_FILE}: {writer.size_mb(SWITCHABLE_FILE):.3f} MB, {len(slots)} adapter "
        "slots; adapter inputs "
        + ", ".join(f"{f} {writer.size_mb(f):.3f} MB" for f in files.values())
    )
    return SwitchableEntry(
        file=SWITCHABLE_FILE,
        slots=slots,
        dtype=str(torch_dtype).removeprefix("torch."),
        adapters=files,
        program_dtype=str(program_dtype).removeprefix("torch."),
    )
