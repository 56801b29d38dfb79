"""Serve several adapters from one process with the foundation loaded once.

Two layouts of an export directory can do this, each a small class with the same interface
(``adapters``, ``adapter``, ``use_adapter(name)`` returning the switch's seconds, ``generate``):

* :class:`SwitchableSession` (``export_llama --switchable``): one program whose adapter
  weights are run-time inputs; a switch passes other tensors (read from
  ``NAME.lora.safetensors`` on first use, then kept), so every adapter shares one copy of the
  packed foundation and one KV cache.
* :class:`BundleSession` (``export_llama --bundle``): ``base`` plus one method per adapter; a
  switch loads that method on first use. Each method keeps its own KV cache and its own XNNPACK
  packing of the foundation weights.
* :class:`TemplateSession` (``--switchable --adapter-template``): a switch makes the adapter's
  program from ``template.pte`` and its ``NAME.lora.safetensors``
  (:func:`~edgelora.format.template.program_from_inputs`) and loads it in place of the previous
  one: decode at a lowered adapter program's speed, each adapter stored as its small input
  file. A switch loads a program, so XNNPACK packs the foundation again (this runtime has no
  shared weight cache): slower switches, one program in memory at a time.

* :class:`ProgramsSession` (any export): a switch loads ``NAME.pte`` in place of the previous
  program. Decode at the adapter program's speed; XNNPACK packs the foundation again per
  switch.

:func:`AdapterSession` opens whichever the export has (switchable, else bundle, else separate
programs) or the ``mode`` asked for. A switch starts a new sequence: ``generate`` prefills from position 0, and
``append`` (a conversation's next turn) continues from the current position, which a switch
resets -- one adapter's KV cache is never read by another's tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from edgelora.errors import AdapterError, ProgramError
from edgelora.format.adapter_inputs import load_adapter_tensors, program_inputs, zero_inputs
from edgelora.format.layout import BASE_PROGRAM, program_file
from edgelora.format.manifest import Manifest, read_export
from edgelora.format.template import patch_template, program_from_inputs, slot_weights
from edgelora.generation import Generation
from edgelora.runtime.program import LlamaProgram

MODES = ("auto", "switchable", "bundle", "template", "programs")


class _Session:
    mode = ""
    adapters: list[str]
    program: LlamaProgram

    def _check(self, name: str | None) -> str:
        name = name or BASE_PROGRAM
        if name != BASE_PROGRAM and name not in self.adapters:
            raise ProgramError(f"no adapter {name!r} in this export (have: {self.adapters})")
        return name

    position = 0  # the next position of the current sequence
    _current = ""  # the adapter whose program runs ("base": none; "": none loaded yet)

    @property
    def adapter(self) -> str | None:
        return None if self._current in (BASE_PROGRAM, "") else self._current

    def _load(self, name: str, program: Path, foundation: Path) -> None:
        """Load ``program`` in place of the current one (released first, with its packed
        foundation) as adapter ``name``'s, and start a new sequence."""
        self.program = None
        self.program = LlamaProgram(program, foundation)
        self._current = name
        self.position = 0  # a switch starts a new sequence

    def generate(
        self, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = False
    ) -> Generation:
        """A new sequence: prefill ``prompt`` from position 0, decode greedily."""
        self.position = 0
        gen = self.program.generate(prompt, max_new_tokens, stop_at_eos=stop_at_eos)
        self.position = len(prompt) + max(len(gen.tokens) - 1, 0)  # the last token is not fed
        return gen

    def append(self, tokens: list[int]) -> torch.Tensor:
        """Continue the current sequence with ``tokens`` (a conversation's next turn); returns
        their logits. After :meth:`use_adapter` the sequence is a new one: the KV cache of the
        previous adapter is never attended to by the next adapter's tokens."""
        logits = self.program.forward(tokens, self.position)
        self.position += len(tokens)
        return logits


class SwitchableSession(_Session):
    """``switchable.pte`` with each adapter's inputs (see the module docstring)."""

    mode = "switchable"

    def __init__(self, export_dir: Path, manifest: Manifest) -> None:
        entry = manifest.switchable
        self.slots = entry.slots
        self._files = {name: export_dir / f for name, f in entry.adapters.items()}
        self.adapters = list(self._files)
        self._stored, self._dtype = entry.input_dtypes
        zeros = zero_inputs(self.slots, self._dtype)
        self._inputs: dict[str, list[torch.Tensor]] = {BASE_PROGRAM: zeros}
        self.program = LlamaProgram(export_dir / entry.file, export_dir / entry.foundation)
        self.program.extra_inputs = zeros
        self._current = BASE_PROGRAM

    def use_adapter(self, name: str | None) -> float:
        """Switch to adapter ``name`` (``None``/``"base"``: none); returns the seconds taken."""
        name = self._check(name)
        t = time.perf_counter()
        if name not in self._inputs:
            try:
                stored = load_adapter_tensors(self._files[name], self.slots, self._stored)
                self._inputs[name] = program_inputs(stored, self.slots, self._stored, self._dtype)
            except AdapterError as e:
                raise ProgramError(str(e)) from None
        self.program.extra_inputs = self._inputs[name]
        self._current = name
        self.position = 0  # a switch starts a new sequence
        return time.perf_counter() - t


class BundleSession(_Session):
    """``bundle.pte``: one method per adapter (see the module docstring)."""

    mode = "bundle"

    def __init__(self, export_dir: Path, manifest: Manifest) -> None:
        entry = manifest.bundle
        self.adapters = [m for m in entry.methods if m != BASE_PROGRAM]
        self.program = LlamaProgram(
            export_dir / entry.file, export_dir / entry.foundation, method=BASE_PROGRAM
        )

    @property
    def adapter(self) -> str | None:
        return None if self.program.method == BASE_PROGRAM else self.program.method

    def use_adapter(self, name: str | None) -> float:
        """Switch to adapter ``name`` (``None``/``"base"``: none); returns the seconds taken."""
        seconds = self.program.select_method(self._check(name))
        self.position = 0  # a switch starts a new sequence
        return seconds


class TemplateSession(_Session):
    """``template.pte`` and each adapter's inputs (see the module docstring)."""

    mode = "template"

    def __init__(self, export_dir: Path, manifest: Manifest) -> None:
        entry = manifest.switchable
        self._dir, self._entry = export_dir, entry
        self._sha = manifest.files[entry.template.file].sha256
        self.adapters = list(entry.adapters)
        self._stored, _ = entry.input_dtypes
        self._scratch = tempfile.TemporaryDirectory(prefix="edgelora-template-")
        base = manifest.programs.get(BASE_PROGRAM)
        self._base = None if base is None else export_dir / base.file
        self.use_adapter(None)

    def use_adapter(self, name: str | None) -> float:
        """Switch to adapter ``name`` (``None``/``"base"``: none); returns the seconds taken
        (making the program and loading it)."""
        name = self._check(name)
        t = time.perf_counter()
        path = self._base
        if name != BASE_PROGRAM or path is None:  # the base: the template with zero weights
            entry = self._entry
            template = (self._dir / entry.template.file, entry.template, self._sha)
            try:
                if name == BASE_PROGRAM:
                    zeros = slot_weights(
                        zero_inputs(entry.slots, getattr(torch, entry.template.dtype))
                    )
                    data = patch_template(*template, zeros)
                else:
                    inputs = self._dir / entry.adapters[name]
                    data = program_from_inputs(*template, entry.slots, inputs, self._stored)
            except AdapterError as e:
                raise ProgramError(str(e)) from None
            path = Path(self._scratch.name) / program_file(name)
            path.write_bytes(data)
        self._load(name, path, self._dir / self._entry.foundation)
        return time.perf_counter() - t


class ProgramsSession(_Session):
    """``base.pte`` and ``NAME.pte``: one loaded at a time (see the module docstring)."""

    mode = "programs"

    def __init__(self, export_dir: Path, manifest: Manifest) -> None:
        self._dir, self._programs = export_dir, manifest.programs
        self.adapters = [n for n in manifest.programs if n != BASE_PROGRAM]
        self.use_adapter(None)

    def use_adapter(self, name: str | None) -> float:
        """Switch to adapter ``name`` (``None``/``"base"``: none); returns the seconds taken."""
        name = self._check(name)
        if name not in self._programs:
            raise ProgramError(f"this export has no {name}.pte (have: {sorted(self._programs)})")
        if name == self._current:
            self.position = 0
            return 0.0
        t = time.perf_counter()
        entry = self._programs[name]
        self._load(name, self._dir / entry.file, self._dir / entry.foundation)
        return time.perf_counter() - t


def AdapterSession(  # noqa: N802 - a factory standing in for the class users construct
    export_dir: str | Path, mode: str = "auto"
) -> SwitchableSession | BundleSession | TemplateSession | ProgramsSession:
    """The session of an export directory: ``mode`` ``switchable``, ``bundle``, ``template``,
    ``programs``, or ``auto`` (switchable, else bundle, else programs: what the export has).
    :class:`ProgramError` if the export has no such program."""
    export_dir = Path(export_dir)
    if mode not in MODES:
        raise ProgramError(f"mode must be one of {MODES}, got {mode!r}")
    manifest = read_export(export_dir)
    if mode == "auto":
        mode = "switchable" if manifest.switchable else "bundle" if manifest.bundle else "programs"
    if mode == "programs":
        return ProgramsSession(export_dir, manifest)
    if mode == "template":
        if manifest.switchable is None or manifest.switchable.template is None:
            raise ProgramError(
                f"{export_dir}: no template program in this export (re-export with "
                "--switchable --adapter-template)"
            )
        return TemplateSession(export_dir, manifest)
    if getattr(manifest, mode) is None:
        raise ProgramError(
            f"{export_dir}: no {mode} program in this export (re-export with --{mode})"
        )
    cls = SwitchableSession if mode == "switchable" else BundleSession
    return cls(export_dir, manifest)
