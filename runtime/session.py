"""Load an exported program on the ExecuTorch runtime and generate greedily with its KV cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgelora.errors import ProgramError

# Constant methods ExecuTorch's LLM runner reads (export/pipeline.runner_metadata writes them).
RUNNER_METADATA_METHODS = (
    "get_max_seq_len",
    "get_max_context_len",
    "get_vocab_size",
    "get_n_layers",
    "get_bos_id",
    "get_eos_ids",
    "use_kv_cache",
    "enable_dynamic_shape",
)

# A constant method of our programs: the sha256 (32 uint8) of the foundation.ptd they need.
FOUNDATION_SHA_METHOD = "get_foundation_sha256"
# ... and its own checksum: sha256 of the .pte with these 32 bytes zeroed.
PROGRAM_SHA_METHOD = "get_program_sha256"
_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file (cached per path, size and mtime for this process)."""
    import hashlib

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def required_foundation_sha(program) -> str | None:
    """The foundation sha256 a loaded ``executorch.runtime`` program records, or ``None`` for
    programs without the method (not exported by edgelora, or before it had one)."""
    sha = _constant_bytes(program, FOUNDATION_SHA_METHOD)
    return None if sha is None else sha.hex()


def _constant_bytes(program, method: str) -> bytes | None:
    if method not in set(program.method_names):
        return None
    return bytes(program.load_method(method).execute([])[0].numpy().tobytes())


def _checksum_matches(pte: Path, own: bytes) -> bool:
    import hashlib

    blob = pte.read_bytes()
    return blob.count(own) == 1 and hashlib.sha256(blob.replace(own, bytes(32))).digest() == own


def recorded_checksums(pte: Path) -> dict[str, object]:
    """What a program records about itself, read by our own parser (no runtime load):
    ``foundation_sha256`` and ``checksum_ok`` (``None`` where it has no such method)."""
    from edgelora.backends.xnnpack.files import read_pte

    constants = read_pte(pte).constants
    own, want = constants.get(PROGRAM_SHA_METHOD), constants.get(FOUNDATION_SHA_METHOD)
    return {
        "foundation_sha256": None if want is None else want.hex(),
        "checksum_ok": None if own is None else _checksum_matches(pte, own),
    }


def verify_program(pte: Path, data: Path | None) -> None:
    """Before a program runs: it must parse, match its own checksum and, if it records one,
    be paired with ``data`` of the foundation sha256 it was exported with. Raises
    :class:`ProgramError` naming the file (and both hashes for a wrong foundation).

    Everything is checked by our own parser before ExecuTorch's loader sees the file: the
    runtime aborts the whole process on some malformed programs."""
    recorded = recorded_checksums(pte)
    if recorded["checksum_ok"] is False:
        raise ProgramError(f"{pte}: corrupt program (its checksum does not match its bytes)")
    want = recorded["foundation_sha256"]
    if want is None:
        return
    if data is None:
        raise ProgramError(
            f"{pte} needs its foundation data file (sha256 {want[:16]}...); pass --data "
            "foundation.ptd"
        )
    got = file_sha256(data)
    if got != want:
        raise ProgramError(
            f"{pte} was exported with a foundation of sha256 {want[:16]}..., but {data} has "
            f"sha256 {got[:16]}...: pass the foundation.ptd exported with this program"
        )


def resident_mib() -> float:
    """This process's resident memory in MiB (Linux ``/proc``; elsewhere the peak so far)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, B on macOS
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _register_kernels() -> None:
    # Quantized embedding kernels (embedding_4bit / embedding_byte) and, when a program uses
    # them, ExecuTorch's custom LLM ops must be registered in this process before loading.
    import executorch.kernels.quantized  # noqa: F401

    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except ImportError:  # pragma: no cover - the pinned wheel ships them
        pass


@dataclass
class Generation:
    """Result of :meth:`LlamaProgram.generate`."""

    prompt: list[int]
    tokens: list[int]  # generated ids (greedy), not including the prompt
    prompt_logits: torch.Tensor  # [len(prompt), vocab] float32
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_ms_per_token(self) -> float:
        if not self.decode_s:
            return float("nan")
        steps = sorted(self.decode_s)
        return 1e3 * steps[len(steps) // 2]  # median: robust to a noisy step


class LlamaProgram:
    """A ``forward(tokens, input_pos)`` program loaded with (at most) one data file.

    Raises :class:`ProgramError` naming the files if they are missing, corrupt, or if the data
    file lacks keys the program needs.
    """

    def __init__(
        self, pte: str | Path, data: str | Path | None = None, *, method: str = "forward"
    ) -> None:
        from executorch.runtime import Runtime

        _register_kernels()
        self.pte, self.data = Path(pte), (Path(data) if data is not None else None)
        for path, kind in ((self.pte, "program"), (self.data, "data")):
            if path is not None and not path.is_file():
                raise ProgramError(f"{path}: {kind} file not found")
        verify_program(self.pte, self.data)
        try:
            self._program = Runtime.get().load_program(self.pte, data_path=self.data)
            self._methods = {}
            self.method = method
            self.extra_inputs: list[torch.Tensor] = []  # a switchable program's lora inputs
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
        from edgelora.backends.xnnpack.files import missing_keys

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
        out = self._forward.execute([t, pos, *self.extra_inputs])[0]
        return out.reshape(-1, out.shape[-1])

    def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """Prefill ``prompt`` in one call, then decode ``max_new_tokens`` greedily."""
        if not prompt:
            raise ProgramError("the prompt must hold at least one token")
        vocab = self.metadata.get("get_vocab_size")
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= int(vocab))]
        if bad:
            raise ProgramError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})"
            )
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(prompt))
        t0 = time.perf_counter()
        logits = self.forward(prompt, 0)
        prefill_s = time.perf_counter() - t0
        gen = Generation(list(prompt), [], logits.clone(), prefill_s)
        next_tok = int(logits[-1].argmax())
        for i in range(max_new_tokens):
            gen.tokens.append(next_tok)
            if i == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            step = self.forward([next_tok], len(prompt) + i)
            gen.decode_s.append(time.perf_counter() - t0)
            next_tok = int(step[-1].argmax())
        return gen


def eager_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> Generation:
    """The same greedy loop on an eager ``Transformer`` (the reference for output matching)."""
    model.reset_cache()
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt]), torch.tensor([0]))[0]
        gen = Generation(list(prompt), [], logits.clone(), time.perf_counter() - t0)
        next_tok = int(logits[-1].argmax())
        for i in range(max_new_tokens):
            gen.tokens.append(next_tok)
            if i == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            step = model(torch.tensor([[next_tok]]), torch.tensor([len(prompt) + i]))[0]
            gen.decode_s.append(time.perf_counter() - t0)
            next_tok = int(step[-1].argmax())
    return gen


class AdapterSession:
    """Serve several adapters from one process with the foundation loaded once.

    Two layouts of an export directory can do this:

    * ``switchable`` (``export_llama --switchable``, preferred when present): one program whose
      adapter weights are run-time inputs; a switch passes other tensors (read from
      ``<name>.lora.safetensors`` on first use, then kept), so every adapter shares one copy of
      the packed foundation and one KV cache.
    * ``bundle`` (``export_llama --bundle``): ``base`` plus one method per adapter; a switch
      loads that method on first use. Each method keeps its own KV cache and its own XNNPACK
      packing of the foundation weights.

    ``use_adapter(name)`` switches (``None`` or ``"base"``: no adapter) and returns the seconds
    it took; a switch starts a new sequence (``generate`` prefills from position 0).
    """

    MODES = ("auto", "switchable", "bundle")

    def __init__(self, export_dir: str | Path, mode: str = "auto") -> None:
        import json

        export_dir = Path(export_dir)
        try:
            manifest = json.loads((export_dir / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise ProgramError(f"{export_dir}: cannot read manifest.json ({e})") from None
        if mode not in self.MODES:
            raise ProgramError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "auto":
            mode = "switchable" if manifest.get("switchable") else "bundle"
        entry = manifest.get(mode)
        if not entry:
            raise ProgramError(
                f"{export_dir}: no {mode} program in this export (re-export with --{mode})"
            )
        self.mode = mode
        self.export_dir = export_dir
        if mode == "bundle":
            self.adapters = [m for m in entry["methods"] if m != "base"]
            self.program = LlamaProgram(
                export_dir / entry["file"], export_dir / entry["foundation"], method="base"
            )
            return
        from edgelora.models.lora_inputs import Slot

        self.slots = [Slot.from_dict(d) for d in entry["slots"]]
        self._files = {name: export_dir / f for name, f in entry["adapters"].items()}
        self.adapters = list(self._files)
        dtype = getattr(torch, entry.get("dtype", "float32"))
        zeros = []
        for s in self.slots:
            zeros += [
                torch.zeros(1, s.in_features, s.rank, dtype=dtype),
                torch.zeros(1, s.rank, s.out_features, dtype=dtype),
            ]
        self._inputs: dict[str, list[torch.Tensor]] = {"base": zeros}
        self.program = LlamaProgram(export_dir / entry["file"], export_dir / entry["foundation"])
        self.program.extra_inputs = zeros
        self._current = "base"

    @property
    def adapter(self) -> str | None:
        current = self.program.method if self.mode == "bundle" else self._current
        return None if current == "base" else current

    def use_adapter(self, name: str | None) -> float:
        """Switch to adapter ``name``; returns the switch time in seconds."""
        name = name or "base"
        if name != "base" and name not in self.adapters:
            raise ProgramError(f"no adapter {name!r} in this export (have: {self.adapters})")
        if self.mode == "bundle":
            return self.program.select_method(name)
        from edgelora.errors import AdapterError
        from edgelora.models.lora_inputs import load_adapter_tensors

        t = time.perf_counter()
        if name not in self._inputs:
            try:
                self._inputs[name] = load_adapter_tensors(self._files[name], self.slots)
            except AdapterError as e:
                raise ProgramError(str(e)) from None
        self.program.extra_inputs = self._inputs[name]
        self._current = name
        return time.perf_counter() - t

    def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        return self.program.generate(prompt, max_new_tokens)
