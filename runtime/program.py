"""A program on the ExecuTorch runtime: verified, loaded with its foundation, run greedily."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from edgelora.errors import ProgramError
from edgelora.format.checksums import (
    FOUNDATION_SHA_METHOD,
    RUNNER_METADATA_METHODS,
    verify_program,
)
from edgelora.generation import Generation, greedy_generate


def register_kernels() -> None:
    """Register the kernels our programs may use in this process before loading one: the
    quantized embedding kernels (``embedding_4bit``/``embedding_byte``) and ExecuTorch's
    custom LLM ops (``llama::update_cache``/``llama::custom_sdpa``)."""
    import executorch.kernels.quantized  # noqa: F401

    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except ImportError:  # pragma: no cover - the pinned wheel ships them
        pass


class LlamaProgram:
    """A ``forward(tokens, input_pos)`` program loaded with (at most) one data file.

    Before ExecuTorch's loader sees anything, the program is parsed by our own reader and its
    checksums verified (:func:`edgelora.format.checksums.verify_program`). Raises
    :class:`ProgramError` naming the files if they are missing, corrupt, or if the data file
    lacks keys the program needs. ``extra_inputs`` are appended to every call (a switchable
    program's ``lora`` inputs). ``allow_unverified`` runs a program that has no checksums
    (ExecuTorch's own example's, for a baseline).
    """

    def __init__(
        self,
        pte: str | Path,
        data: str | Path | None = None,
        *,
        method: str = "forward",
        allow_unverified: bool = False,
    ) -> None:
        from executorch.runtime import Runtime

        register_kernels()
        self.pte, self.data = Path(pte), (Path(data) if data is not None else None)
        for path, kind in ((self.pte, "program"), (self.data, "data")):
            if path is not None and not path.is_file():
                raise ProgramError(f"{path}: {kind} file not found")
        verify_program(self.pte, self.data, allow_unverified=allow_unverified)
        self.extra_inputs: list[torch.Tensor] = []
        try:
            self._program = Runtime.get().load_program(self.pte, data_path=self.data)
            self._methods = {}
            self.method = method
            self._forward = self._load(method)
        except ProgramError:
            raise
        except Exception as e:  # the runtime raises RuntimeError/ValueError with an error code
            raise ProgramError(self._explain_load_failure(e)) from None
        self.metadata = self._read_metadata()

    def _load(self, method: str):
        if method not in self._methods:
            names = set(self._program.method_names)
            if method not in names:
                raise ProgramError(f"{self.pte}: no method {method!r} (has: {sorted(names)})")
            self._methods[method] = self._program.load_method(method)
        return self._methods[method]

    def select_method(self, method: str) -> float:
        """Run ``method`` from now on (loaded on first use, then kept); returns the seconds the
        switch took."""
        t = time.perf_counter()
        self._forward = self._load(method)
        self.method = method
        return time.perf_counter() - t

    def _explain_load_failure(self, err: Exception) -> str:
        from edgelora.format.pte import missing_keys

        what = f"{self.pte}" + (
            f" with data file {self.data}" if self.data else " without a data file"
        )
        try:
            missing = missing_keys(self.pte, self.data)
        except ProgramError as e:
            return f"cannot load {what}: {e}"
        if missing:
            example = ", ".join(sorted(missing)[:3])
            return (
                f"cannot load {what}: the data file lacks {len(missing)} key(s) the program "
                f"needs (e.g. {example}); pass the foundation.ptd it was exported with"
            )
        return f"cannot load {what}: {type(err).__name__}: {err}"

    def _read_metadata(self) -> dict[str, object]:
        meta = {}
        for name in self._program.method_names:
            if name not in RUNNER_METADATA_METHODS:
                continue  # forward, or a bundle's base/adapter methods
            out = self._program.load_method(name).execute([])
            meta[name] = out[0] if len(out) == 1 else list(out)
        return meta

    def recorded_foundation_sha(self) -> str | None:
        """The foundation sha256 the program records, as the runtime reads it (constant method
        ``get_foundation_sha256``), or ``None`` for programs without the method."""
        if FOUNDATION_SHA_METHOD not in set(self._program.method_names):
            return None
        out = self._program.load_method(FOUNDATION_SHA_METHOD).execute([])[0]
        return bytes(out.numpy().tobytes()).hex()

    @property
    def max_seq_len(self) -> int:
        return int(self.metadata.get("get_max_seq_len", 128))

    def forward(self, tokens: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Logits ``[seq, vocab]`` for ``tokens`` placed at positions ``start...`` (``[1, vocab]``,
        the last position's, for a program exported with ``--logits last``)."""
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
        if start + t.shape[1] > self.max_seq_len:
            raise ProgramError(
                f"{self.pte}: positions {start}..{start + t.shape[1] - 1} exceed the program's "
                f"max_seq_len {self.max_seq_len}"
            )
        pos = torch.tensor([start], dtype=torch.long)
        try:
            out = self._forward.execute([t, pos, *self.extra_inputs])[0]
        except RuntimeError as e:  # the runtime's error code for a method that cannot run
            raise ProgramError(f"{self.pte}: {self.method} failed on the runtime ({e})") from None
        return out.reshape(-1, out.shape[-1])

    @property
    def eos_ids(self) -> set[int]:
        """The ids that end generation, as the program reports them (``get_eos_ids``)."""
        eos = self.metadata.get("get_eos_ids", [])
        if isinstance(eos, torch.Tensor):
            eos = eos.flatten().tolist()
        if not isinstance(eos, list):
            eos = [eos]
        return {int(e) for e in eos}

    def generate(
        self, prompt: list[int], max_new_tokens: int, *, stop_at_eos: bool = False
    ) -> Generation:
        """Prefill ``prompt`` in one call, then decode up to ``max_new_tokens`` greedily; with
        ``stop_at_eos``, an EOS id the program reports ends it (the CLIs do, unless
        ``--ignore-eos``; benchmarks and the output match time or compare a fixed number of
        steps)."""
        if not prompt:
            raise ProgramError("the prompt must hold at least one token")
        vocab = self.metadata.get("get_vocab_size")
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= int(vocab))]
        if bad:
            raise ProgramError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(prompt))
        stop = self.eos_ids if stop_at_eos else ()
        return greedy_generate(self.forward, prompt, max_new_tokens, stop)
