"""Updating an export in place (``export_llama --add-to OUT``): add adapters, or remove them,
without touching the foundation or any other program.

1. **Lock and read**: hold ``OUT``'s writer lock (a second update waits), remove what a killed
   writer left, read ``manifest.json`` and check that ``foundation.ptd`` is the file it records.
2. **Check, before any long step**: the names are new (or ``--overwrite``), every setting given
   agrees with the export's (quantization, dtype, fusion, ... all come from the manifest), and
   the model arguments, when given, are the ones the foundation was built from (the
   checkpoint's sha256, or the params and seed).
3. **Switchable inputs** (``OUT`` has ``switchable.pte``): each adapter's
   ``NAME.lora.safetensors``, read off a meta-device model of the export's config and layout --
   no checkpoint, no lowering -- and refused if it does not fit the program's slots. If ``OUT``
   has ``template.pte`` (``--adapter-template``), also ``NAME.pte``: the template's bytes with
   the adapter's weights in place of its own (:mod:`edgelora.format.template`).
4. **Programs** (only with model arguments): rebuild the foundation, export and lower only the
   new programs, each checked to need exactly the ``foundation.ptd`` already there.
5. **Commit**: the new export is staged beside ``OUT`` -- hard links to the files it keeps
   (their bytes and modification times are kept), the new files, the new manifest -- and
   swapped in at once (:func:`edgelora.export.output.commit_update`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgelora.errors import ConfigError, OutputError, ProgramError
from edgelora.export.config import AdapterSpec, FoundationSpec
from edgelora.export.output import commit_update, export_lock, staging_prefix
from edgelora.export.programs import (
    ProgramWriter,
    write_adapter_inputs,
    write_patched_program,
    write_program,
)
from edgelora.export.timing import StageTimer
from edgelora.format.checksums import stamp_program
from edgelora.format.layout import (
    FOUNDATION_FILE,
    adapter_inputs_file,
    program_file,
    sha256_file,
)
from edgelora.format.manifest import FileEntry, Manifest, read_export
from edgelora.format.pte import read_ptd
from edgelora.lora.fusion import set_fusion
from edgelora.lora.record import Adapter
from edgelora.models.args import ModelArgs
from edgelora.models.llama import Transformer, build_model
from edgelora.weights.checkpoint import checkpoint_digest, open_checkpoint


@dataclass(frozen=True)
class ModelSource:
    """The model arguments of the original export, given again to make per-adapter programs:
    its checkpoint, or its ``--params`` (with ``--seed``) for random weights."""

    checkpoint: Path | None = None
    params: Path | None = None
    seed: int | None = None


def export_settings(manifest: Manifest) -> dict[str, object]:
    """The export's settings under the names of ``export_llama``'s flags (``--qmode`` ...)."""
    return {
        **FoundationSpec.of_export(manifest).flags(),
        "max_seq_len": manifest.model.get("max_seq_len"),
        "bos_id": manifest.bos_id,
        "eos_id": list(manifest.eos_ids),
    }


def check_settings(out_dir: Path, manifest: Manifest, given: dict[str, object]) -> None:
    """Refuse a flag given with ``--add-to`` whose value differs from the export's: an added
    adapter runs on the foundation that is there, made with the export's settings."""
    have = export_settings(manifest)
    for name, value in given.items():
        if value is None or name not in have:
            continue
        if value != have[name]:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} {value}: {out_dir} was exported with {have[name]}; an added adapter "
                f"uses the export's settings (leave {flag} out, or re-export)"
            )


def add_adapters(
    out_dir: Path,
    specs: list[AdapterSpec],
    *,
    source: ModelSource | None = None,
    given: dict[str, object] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Add the adapters of ``specs`` to the export in ``out_dir`` (see the module docstring);
    returns the new manifest. Without ``source``, switchable inputs are written (the export must
    have ``switchable.pte``), and a ``NAME.pte`` patched from ``template.pte`` if it has one;
    with it, one lowered ``NAME.pte`` per adapter (and the inputs).

    Raises :class:`ConfigError`/:class:`AdapterError`/:class:`OutputError` naming what does not
    fit, before anything is written."""
    from edgelora.weights.adapter_files import load_adapter

    timer = StageTimer(log)
    _check_exists(out_dir)
    with export_lock(out_dir, log=log) as out_dir:
        # 1. Lock and read.
        manifest = _read_checked(out_dir)
        # 2. Check.
        check_settings(out_dir, manifest, given or {})
        args = ModelArgs.from_dict(manifest.model, source=f"{out_dir}/manifest.json")
        _check_names(out_dir, manifest, [s.name for s in specs], overwrite)
        adapters = [load_adapter(s.path, args, s.name, scale=s.scale) for s in specs]
        for adapter in adapters:
            for note in adapter.notes:
                log(f"  adapter {adapter.name}: {note}")
        if source is None and manifest.switchable is None:
            raise ConfigError(
                f"{out_dir} has no switchable.pte, so an adapter needs its own program: give "
                "the model arguments of the export (--checkpoint, or --params and --seed)"
            )
        if source is not None:
            _check_source(out_dir, manifest, source)
        if any(p.merged_adapter is not None for p in manifest.programs.values()):
            raise ConfigError(
                f"{out_dir} holds a merged export (--merge): its foundation has an adapter "
                "folded in, which other adapters were not trained against"
            )
        new_files: dict[str, Path] = {}
        programs = dict(manifest.programs)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=staging_prefix(out_dir)) as t:
            stage = Path(t)
            if source is None:
                # 3. Switchable inputs, from the export's config and layout alone.
                with timer("switchable inputs"):
                    model = layout_model(args, manifest)
                    _write_inputs(stage, model, adapters, manifest, new_files)
                if manifest.switchable.template is not None:
                    # 3b. Programs from template.pte: its bytes with the adapter's in place.
                    with timer("programs from template.pte"):
                        for adapter in adapters:
                            path = stage / program_file(adapter.name)
                            entry = write_patched_program(out_dir, manifest, model, adapter, path)
                            programs[adapter.name] = entry
                            new_files[entry.file] = path
            else:
                # 4. Programs.
                model = _rebuild_foundation(out_dir, manifest, args, source, timer, log)
                writer = ProgramWriter(
                    stage,
                    stage,
                    args,
                    timer,
                    bos_id=manifest.bos_id,
                    eos_ids=tuple(manifest.eos_ids),
                    foundation=(
                        manifest.foundation_sha256,
                        frozenset(read_ptd(out_dir / FOUNDATION_FILE)),
                    ),
                )
                # the export's adapter programs' dtype (int8 or float)
                dtype = next((p.adapter_dtype for p in manifest.programs.values() if p.adapter), "")
                for adapter in adapters:
                    name, entry = write_program(writer, model, adapter, None, dtype)
                    stamp_program(stage / entry.file, manifest.foundation_sha256)
                    programs[name] = replace(entry, foundation_sha256=manifest.foundation_sha256)
                    new_files[entry.file] = stage / entry.file
                if manifest.switchable is not None:
                    _write_inputs(stage, model, adapters, manifest, new_files)
            # 5. Commit, through the journal.
            with timer("move into place + manifest"):
                files = dict(manifest.files)
                for name, path in new_files.items():
                    files[name] = FileEntry.of(path)
                switchable = manifest.switchable
                if switchable is not None:
                    switchable = replace(
                        switchable,
                        adapters={
                            **switchable.adapters,
                            **{
                                a.name: adapter_inputs_file(a.name)
                                for a in adapters
                                if adapter_inputs_file(a.name) in new_files
                            },
                        },
                    )
                manifest = replace(manifest, programs=programs, switchable=switchable, files=files)
                commit_update(out_dir, stage / "stage", manifest, new_files, [])
    log(
        f"added {', '.join(a.name for a in adapters)} to {out_dir}: "
        + ", ".join(f"{n} {manifest.files[n].size / 1e6:.3f} MB" for n in new_files)
    )
    return manifest


def remove_adapters(
    out_dir: Path, names: list[str], *, log: Callable[[str], None] = print
) -> Manifest:
    """Remove adapters (their programs and switchable inputs) from the export in ``out_dir``:
    the manifest stops listing them (replaced atomically), then their files are deleted."""
    _check_exists(out_dir)
    with export_lock(out_dir, log=log) as out_dir:
        manifest = _read_checked(out_dir)
        programs, files = dict(manifest.programs), dict(manifest.files)
        inputs = dict(manifest.switchable.adapters) if manifest.switchable else {}
        gone = []
        for name in names:
            entry = programs.get(name)
            if entry is not None and entry.adapter is None:
                raise ConfigError(f"--remove {name}: {entry.file} is the export's base program")
            if entry is None and name not in inputs:
                have = sorted({n for n, p in programs.items() if p.adapter} | set(inputs))
                raise ConfigError(f"--remove {name}: {out_dir} has no adapter {name!r} ({have})")
            if entry is not None:
                gone.append(programs.pop(name).file)
            if name in inputs:
                gone.append(inputs.pop(name))
        for file in gone:
            files.pop(file, None)
        switchable = manifest.switchable
        if switchable is not None:
            switchable = replace(switchable, adapters=inputs)
        manifest = replace(manifest, programs=programs, switchable=switchable, files=files)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=staging_prefix(out_dir)) as t:
            commit_update(out_dir, Path(t) / "stage", manifest, {}, gone)
    log(f"removed {', '.join(names)} from {out_dir} ({', '.join(gone)})")
    return manifest


def layout_model(args: ModelArgs, manifest: Manifest) -> Transformer:
    """A model with the export's module layout (fusion) and no weights (meta device): enough to
    fit an adapter to the switchable program's slots, which depend only on shapes."""
    model = build_model(args, sdpa="plain", logits=manifest.logits, empty=True)
    set_fusion(model, manifest.fuse)
    return model


def _check_exists(out_dir: Path) -> None:
    """Before the lock (which creates files beside it): the export directory is there."""
    if not Path(out_dir).is_dir():
        raise OutputError(f"{out_dir}: no such export directory")


def _read_checked(out_dir: Path) -> Manifest:
    """The manifest, every file it lists verified (an update builds on what is there)."""
    _check_exists(out_dir)
    manifest = read_export(out_dir, verify=False)
    found = sha256_file(out_dir / FOUNDATION_FILE)
    if found != manifest.foundation_sha256:
        raise OutputError(
            f"{out_dir / FOUNDATION_FILE} was altered: sha256 {found[:16]}..., the manifest "
            f"records {str(manifest.foundation_sha256)[:16]}...; re-export"
        )
    try:
        manifest.verify(out_dir)
    except ProgramError as e:
        raise OutputError(str(e)) from None
    return manifest


def _check_names(out_dir: Path, manifest: Manifest, names: list[str], overwrite: bool) -> None:
    if not names:
        raise ConfigError("--add-to needs at least one --lora NAME=DIR (or --remove NAME)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"adapter names must be unique, repeated: {dupes}")
    inputs = manifest.switchable.adapters if manifest.switchable else {}
    for name in names:
        entry = manifest.programs.get(name)
        if entry is not None and entry.adapter is None:
            raise ConfigError(f"adapter name {name!r} is the export's base program")
        if (entry is not None or name in inputs) and not overwrite:
            raise ConfigError(
                f"{out_dir} already has an adapter {name!r}; pass --overwrite to replace it, "
                "or choose another name"
            )


def _check_source(out_dir: Path, manifest: Manifest, source: ModelSource) -> None:
    """The model arguments given are the ones ``out_dir``'s foundation was built from."""
    if manifest.checkpoint is not None:
        if source.checkpoint is None:
            raise ConfigError(
                f"{out_dir} was exported from the checkpoint {manifest.checkpoint}: give "
                "--checkpoint (not --params) to make its programs"
            )
        if manifest.checkpoint_sha256 is None:
            raise ConfigError(
                f"{out_dir}'s manifest records no checkpoint sha256 (an older export), so the "
                "checkpoint cannot be verified; re-export"
            )
        if not source.checkpoint.exists():
            raise ConfigError(f"{source.checkpoint}: checkpoint not found")
        digest = checkpoint_digest(source.checkpoint)
        if digest != manifest.checkpoint_sha256:
            raise ConfigError(
                f"--checkpoint {source.checkpoint} (sha256 {digest[:16]}...) is not the "
                f"checkpoint {out_dir} was exported from ({manifest.checkpoint}, sha256 "
                f"{manifest.checkpoint_sha256[:16]}...)"
            )
        return
    if source.params is None:
        raise ConfigError(
            f"{out_dir} was exported from random weights: give its --params and --seed"
        )
    max_len = manifest.model.get("max_seq_len")
    args = json.loads(json.dumps(ModelArgs.from_json(source.params, max_seq_len=max_len).to_dict()))
    differ = sorted(
        k for k in set(args) | set(manifest.model) if args.get(k) != manifest.model.get(k)
    )
    if differ:
        raise ConfigError(
            f"--params {source.params} is not the model {out_dir} was exported with: "
            + ", ".join(f"{k} {args.get(k)!r} vs {manifest.model.get(k)!r}" for k in differ[:4])
        )
    seed = manifest.seed if source.seed is None else source.seed
    if seed != manifest.seed:
        raise ConfigError(f"--seed {seed}: {out_dir} was exported with seed {manifest.seed}")


def _rebuild_foundation(
    out_dir: Path,
    manifest: Manifest,
    args: ModelArgs,
    source: ModelSource,
    timer: StageTimer,
    log: Callable[[str], None],
) -> Transformer:
    from edgelora.export.foundation import build_foundation

    spec = FoundationSpec.of_export(manifest, out_dir, checkpoint=source.checkpoint)
    checkpoint = None if source.checkpoint is None else open_checkpoint(source.checkpoint)
    with timer("build + quantize foundation"):
        model, _, _ = build_foundation(args, spec, checkpoint=checkpoint, log=log)
    return model


def _write_inputs(
    stage: Path,
    model: torch.nn.Module,
    adapters: list[Adapter],
    manifest: Manifest,
    new_files: dict[str, Path],
) -> None:
    switchable = manifest.switchable
    dtype = getattr(torch, switchable.dtype)
    for adapter in adapters:
        name = adapter_inputs_file(adapter.name)
        write_adapter_inputs(model, adapter, switchable.slots, dtype, stage / name)
        new_files[name] = stage / name
