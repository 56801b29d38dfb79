"""One program writer for every kind of program an export makes: base, adapter, bundle and
switchable programs are all traced with :func:`trace` and written by :class:`ProgramWriter`."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgelora._memory import release_free_memory
from edgelora.errors import InternalError
from edgelora.export.progress import Counter
from edgelora.export.timing import StageTimer
from edgelora.format.adapter_inputs import Slot, save_adapter_tensors
from edgelora.format.checksums import program_methods
from edgelora.format.layout import (
    BASE_PROGRAM,
    FOUNDATION_FILE,
    TEMPLATE_FILE,
    program_file,
    sha256_file,
)
from edgelora.format.manifest import AdapterEntry, Manifest, ProgramEntry
from edgelora.format.template import patch_template, slot_weights, template_fill
from edgelora.lora.attach import adapter_attached, adapter_fqns, is_adapter_tensor
from edgelora.lora.record import Adapter
from edgelora.lora.slots import adapter_tensors, slot_constants
from edgelora.models.args import ModelArgs
from edgelora.quant.linear import store_adapter_weights


def trace(
    module: nn.Module, args: ModelArgs, *, extra_inputs: list[torch.Tensor] | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``forward(tokens [1, seq], input_pos [1])`` with dynamic ``seq``;
    with ``extra_inputs``, of ``forward(tokens, input_pos, extra_inputs)`` (static shapes)."""
    # max_seq_len - 1, as ExecuTorch's example does: with the full length the symbolic shape
    # solver emits a guard (seq != max_seq_len) that contradicts the range.
    seq = torch.export.Dim("seq", min=1, max=args.max_seq_len - 1)
    # Two tokens, not one: a length-1 example would let export specialise the sequence dim.
    inputs = (torch.tensor([[1, 2]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dynamic: tuple = ({1: seq}, None)
    if extra_inputs is not None:
        inputs, dynamic = (*inputs, extra_inputs), (*dynamic, [None] * len(extra_inputs))
    from edgelora.backends.xnnpack.lower import decompose_for_xnnpack

    with torch.no_grad():
        ep = torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False)
        return decompose_for_xnnpack(ep)


class ProgramWriter:
    """Lowers programs to XNNPACK and writes ``.pte`` files into ``stage``.

    The first program written (the base) writes ``stage/foundation.ptd``; every later one
    writes its foundation into ``scratch`` and must produce the same bytes (checked), so one
    ``foundation.ptd`` serves them all. With ``foundation`` (an existing export's sha256 and
    the pass-made constant names it holds), every program is a later one, checked against it. Constants ExecuTorch's passes derive from foundation
    weights in the base program are sent to the foundation by every later program too.
    """

    def __init__(
        self,
        stage: Path,
        scratch: Path,
        args: ModelArgs,
        timer: StageTimer,
        *,
        bos_id: int = 1,
        eos_ids: tuple[int, ...] = (2,),
        foundation: tuple[str, frozenset[str]] | None = None,
    ) -> None:
        self.stage, self.scratch, self.args, self.timer = stage, scratch, args, timer
        self._methods = dict(
            max_seq_len=args.max_seq_len,
            vocab_size=args.vocab_size,
            n_layers=args.n_layers,
            bos_id=bos_id,
            eos_ids=eos_ids,
        )
        self._base_derived: frozenset[str] | None = None
        self._foundation_sha = ""
        if foundation is not None:  # an existing export's: every program written must match it
            self._foundation_sha, self._base_derived = foundation

    def trace(self, module: nn.Module, label: str, **kw) -> torch.export.ExportedProgram:
        with self.timer(f"{label}: torch.export"):
            return trace(module, self.args, **kw)

    def write(
        self,
        file: str,
        programs: torch.export.ExportedProgram | dict[str, torch.export.ExportedProgram],
        *,
        is_adapter: Callable[[str], bool],
        label: str,
        half_conversions: bool = False,
    ):
        """Lower ``programs`` (one, or method name -> program) into ``stage/file``; constants
        for which ``is_adapter(fqn)`` stay in the program, all others go to the foundation.
        Returns the lowered program's constant split and derived names (its serialised form
        is released once written). ``half_conversions``: the program converts between fp32
        and fp16 on its adapter path (delegated; :mod:`edgelora.backends.xnnpack.half`)."""
        from edgelora.backends.xnnpack.lower import lower_to_xnnpack

        first = self._base_derived is None
        with self.timer(f"{label}: lower to XNNPACK + serialise"):
            bar = Counter(f"{label}: XNNPACK partitions", unit="partition")
            try:
                lowered = lower_to_xnnpack(
                    programs,
                    is_adapter=is_adapter,
                    constant_methods=program_methods(**self._methods),
                    foundation_derived=self._base_derived,
                    progress=bar,
                    half_conversions=half_conversions,
                )
            finally:
                bar.close()
            lowered.write_pte(self.stage / file)
            digests = None if first else lowered.data_file_digests()
            if digests is None:  # the base program, or no in-memory digests: write them
                data_dir = self.stage if first else self.scratch / label
                data_dir.mkdir(exist_ok=True)
                written = lowered.write_data_files(data_dir)
                digests = {p.name: sha256_file(p) for p in written}
        self._check_foundation(digests, label, first=first)
        if first:
            self._base_derived = lowered.derived_foundation
        # The serialised program and its buffers (GBs at 1B) are written: free them now, and
        # the lowering's reference cycles with them, before the next program is traced.
        lowered.manager = None
        gc.collect()
        release_free_memory()
        return lowered

    def _check_foundation(self, digests: dict[str, str], label: str, *, first: bool) -> None:
        """The base program wrote ``foundation.ptd`` and nothing else; every later program's
        foundation has the same sha256 (compared from memory: no second copy is written)."""
        if list(digests) != [FOUNDATION_FILE]:
            raise InternalError(
                f"{label}: expected the lowering to write only {FOUNDATION_FILE}, got "
                f"{list(digests)}"
            )
        if first:
            self._foundation_sha = digests[FOUNDATION_FILE]
        elif digests[FOUNDATION_FILE] != self._foundation_sha:
            raise InternalError(
                f"the foundation of {label!r} (sha256 {digests[FOUNDATION_FILE][:16]}...) differs "
                f"from the base program's ({self._foundation_sha[:16]}...); programs would not "
                "share one foundation.ptd"
            )

    def size_mb(self, file: str) -> float:
        return (self.stage / file).stat().st_size / 1e6


def adapter_entry(adapter: Adapter) -> AdapterEntry:
    return AdapterEntry(
        source=adapter.source,
        scale=adapter.scale,
        ranks=adapter.ranks,
        modules=sorted(adapter.modules),
        bytes_fp32=adapter.num_bytes,
    )


def write_program(
    writer: ProgramWriter,
    model: nn.Module,
    adapter: Adapter | None,
    merged: Adapter | None,
    adapter_dtype: str = "",
) -> tuple[str, ProgramEntry]:
    """``NAME.pte`` of ``adapter`` (``None``: the base, named after a merged adapter), its
    adapter weights in the model's dtype, or ``adapter_dtype`` ``"int8"`` (XNNPACK's F32-QC8W
    linear: int8 weights under fp32 activations) or ``"fp16"``
    (:func:`edgelora.quant.linear.store_adapter_weights`)."""
    name = adapter.name if adapter is not None else merged.name if merged else BASE_PROGRAM
    adapter_dtype = adapter_dtype if adapter is not None else ""
    with adapter_attached(model, adapter):
        # the attached copies: detached on exit
        converts = store_adapter_weights(model, adapter_dtype)
        ep = writer.trace(model, name)
        is_adapter = is_adapter_tensor(adapter_fqns(model))
        lowered = writer.write(
            program_file(name), ep, is_adapter=is_adapter, label=name, half_conversions=converts
        )
    return name, ProgramEntry(
        file=program_file(name),
        adapter=None if adapter is None else adapter_entry(adapter),
        merged_adapter=adapter_entry(merged) if adapter is None and merged else None,
        adapter_constants=sorted(lowered.split.adapter),
        adapter_constants_in_foundation=sorted(lowered.split.shared),
        adapter_dtype=adapter_dtype,
    )


def write_adapter_inputs(
    model: nn.Module, adapter: Adapter, slots: list[Slot], dtype: torch.dtype, path: Path
) -> None:
    """``NAME.lora.safetensors``: ``adapter``'s run-time inputs for a switchable program with
    ``slots`` (:func:`edgelora.lora.slots.adapter_tensors`; it refuses an adapter that does not
    fit them)."""
    save_adapter_tensors(path, adapter_tensors(model, adapter, slots, dtype), slots, dtype)


def write_template(
    writer: ProgramWriter, model: nn.Module, slots: list[Slot], dtype: torch.dtype
) -> list[torch.Tensor]:
    """``template.pte``: ``model`` with ``slots``' weights as constants, filled with seeded
    random values (:mod:`edgelora.format.template`); returns the fill, which
    :func:`~edgelora.format.template.locate_template` finds in the stamped file."""
    fill = template_fill(slots, dtype)
    with slot_constants(model, slots, fill):
        ep = writer.trace(model, "template")
        is_adapter = is_adapter_tensor(adapter_fqns(model))
        writer.write(TEMPLATE_FILE, ep, is_adapter=is_adapter, label="template")
    return fill


def write_patched_program(
    out_dir: Path, manifest: Manifest, model: nn.Module, adapter: Adapter, path: Path
) -> ProgramEntry:
    """``NAME.pte`` for ``adapter`` at ``path``: ``out_dir``'s ``template.pte`` with the
    adapter's weights in place of its own -- no lowering (``model`` needs only the export's
    layout, its weights are not read). Refuses an adapter that does not fit the slots."""
    switchable = manifest.switchable
    template = switchable.template
    dtype = getattr(torch, template.dtype)
    inputs = adapter_tensors(model, adapter, switchable.slots, torch.float32)
    weights = [w.to(dtype) for w in slot_weights(inputs)]
    sha = manifest.files[template.file].sha256
    path.write_bytes(patch_template(out_dir / template.file, template, sha, weights))
    return ProgramEntry(
        file=path.name,
        adapter=adapter_entry(adapter),
        adapter_constants=sorted(f"{p.module}.lora_{p.part}.weight" for p in template.parts),
        foundation_sha256=manifest.foundation_sha256,
        template=template.file,
    )
