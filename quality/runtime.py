"""A program on the ExecuTorch runtime as a :class:`~edgelora.quality.scoring.Scorer`: one
program of an export directory (``base``, an adapter's), a program file with its data file, or
an adapter selected in the export's ``switchable.pte``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgelora.errors import ProgramError
from edgelora.format.manifest import read_export
from edgelora.quality.scoring import greedy_loop
from edgelora.runtime.program import LlamaProgram
from edgelora.runtime.sessions import AdapterSession
from edgelora.runtime.text import resolve_program


class RuntimeScorer:
    def __init__(self, program: LlamaProgram, label: str) -> None:
        self.program = program
        self.label = label
        self.max_seq_len = program.max_seq_len

    def logits(self, ids: list[int]) -> torch.Tensor:
        out = self.program.forward(ids, 0)
        if out.shape[0] == len(ids):
            return out
        # A --logits last program returns one row per call: feed the sequence a token at a time.
        return torch.cat([self.program.forward([t], i) for i, t in enumerate(ids)])

    def greedy(
        self, prompt: list[int], max_new_tokens: int, stop: Callable[[int], bool]
    ) -> list[int]:
        return greedy_loop(self.program.forward, prompt, max_new_tokens, stop)


def open_runtime(
    target: str | Path,
    *,
    adapter: str | None = None,
    data: str | Path | None = None,
    switchable: bool = False,
    allow_unverified: bool = False,
) -> RuntimeScorer:
    """The scorer of ``target``: an export directory (``adapter`` names the program, default
    base; with ``switchable`` the adapter is selected in ``switchable.pte``) or a ``.pte`` file
    (``data``: its foundation; ``allow_unverified``: it may lack edgelora's checksums).
    :class:`ProgramError` if there is no such program."""
    target = Path(target)
    if target.is_dir():
        if switchable:
            session = AdapterSession(target, "switchable")
            session.use_adapter(adapter)
            return RuntimeScorer(session.program, f"switchable:{adapter or 'base'}")
        pte, foundation = resolve_program(target, adapter)
        return RuntimeScorer(LlamaProgram(pte, foundation), pte.name)
    if switchable or adapter:
        raise ProgramError(f"{target}: --adapter and --switchable need an export directory")
    program = LlamaProgram(target, data, allow_unverified=allow_unverified)
    return RuntimeScorer(program, target.name)


def export_eos_ids(target: str | Path) -> list[int] | None:
    """The EOS ids an export directory's manifest records (``None`` for a bare program file)."""
    target = Path(target)
    return list(read_export(target).eos_ids) if target.is_dir() else None
