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

:func:`AdapterSession` opens whichever the export has (switchable preferred). A switch starts
a new sequence: ``generate`` prefills from position 0, and ``append`` (a conversation's next
turn) continues from the current position, which a switch resets -- one adapter's KV cache is
never read by another's tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from edgelora.errors import AdapterError, ProgramError
from edgelora.format.adapter_inputs import load_adapter_tensors, program_inputs, zero_inputs
from edgelora.format.layout import BASE_PROGRAM
from edgelora.format.manifest import Manifest, read_export
from edgelora.generation import Generation
from edgelora.runtime.program import LlamaProgram

MODES = ("auto", "switchable", "bundle")


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

    def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """A new sequence: prefill ``prompt`` from position 0, decode greedily."""
        self.position = 0
        gen = self.program.generate(prompt, max_new_tokens)
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

    @property
    def adapter(self) -> str | None:
        return None if self._current == BASE_PROGRAM else self._current

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


def AdapterSession(  # noqa: N802 - a factory standing in for the class users construct
    export_dir: str | Path, mode: str = "auto"
) -> SwitchableSession | BundleSession:
    """The session of an export directory: ``mode`` ``switchable``, ``bundle``, or ``auto``
    (switchable if the export has it). :class:`ProgramError` if the export has no such program."""
    export_dir = Path(export_dir)
    if mode not in MODES:
        raise ProgramError(f"mode must be one of {MODES}, got {mode!r}")
    manifest = read_export(export_dir)
    if mode == "auto":
        mode = "switchable" if manifest.switchable else "bundle"
    if getattr(manifest, mode) is None:
        raise ProgramError(
            f"{export_dir}: no {mode} program in this export (re-export with --{mode})"
        )
    cls = SwitchableSession if mode == "switchable" else BundleSession
    return cls(export_dir, manifest)
