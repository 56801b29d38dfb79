"""``manifest.json``: what an export directory holds and how it was made, as typed records.

One writer (:meth:`Manifest.write`, called by the export's last stage) and one reader
(:meth:`Manifest.read`, used by the runtime, the output-match check and the export itself
when it replaces a directory). :data:`FORMAT` versions the schema; a manifest of another
version is refused by name.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgelora import _fs
from edgelora._jsonfile import read_json
from edgelora.errors import ProgramError
from edgelora.format.adapter_inputs import Slot
from edgelora.format.layout import (
    FOUNDATION_FILE,
    MANIFEST_FILE,
    check_file_name,
    sha256_file,
)
from edgelora.format.template import TemplateEntry

FORMAT = "edgelora-export/1"
MAX_MANIFEST_BYTES = 16 << 20  # far above any export's (a few kB per program)


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        return cls(path.stat().st_size, sha256_file(path))


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter as exported: where it was read from and what it adapts."""

    source: str
    scale: float
    ranks: list[int]
    modules: list[str]
    bytes_fp32: int


@dataclass(frozen=True)
class ProgramEntry:
    """One ``NAME.pte``: its adapter (``None`` for the base), or the adapter merged into it."""

    file: str
    foundation: str = FOUNDATION_FILE
    adapter: AdapterEntry | None = None
    merged_adapter: AdapterEntry | None = None
    adapter_constants: list[str] = field(default_factory=list)
    # adapter tensors byte-identical to a foundation tensor: one key, served by foundation.ptd
    adapter_constants_in_foundation: list[str] = field(default_factory=list)
    foundation_sha256: str = ""
    # "int8" / "fp16": lora_A/lora_B stored so (--adapter-dtype); "": the model's float dtype
    adapter_dtype: str = ""
    template: str = ""  # made from this template program by replacing bytes (no lowering)


@dataclass(frozen=True)
class BundleEntry:
    """``bundle.pte``: the base and every adapter as methods of one program."""

    file: str
    methods: list[str]
    foundation: str = FOUNDATION_FILE


@dataclass(frozen=True)
class SwitchableEntry:
    """``switchable.pte`` and each adapter's input file (adapter name -> file name); ``dtype``
    is the files' adapter dtype, ``program_dtype`` the dtype the program takes its inputs in
    (empty in exports made before it was recorded: the files' dtype)."""

    file: str
    slots: list[Slot]
    dtype: str
    adapters: dict[str, str]
    foundation: str = FOUNDATION_FILE
    program_dtype: str = ""
    # template.pte (--adapter-template): adapter programs made from it by replacing bytes
    template: TemplateEntry | None = None

    @property
    def input_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(stored, program) adapter dtypes as torch dtypes."""
        return getattr(torch, self.dtype), getattr(torch, self.program_dtype or self.dtype)


@dataclass(frozen=True)
class QuantizationEntry:
    qmode: str
    group_size: int
    embedding_bits: int
    embedding_group_size: int
    qparams: str = "affine"
    output_bits: int = 0
    output_qmode: str | None = None  # None: from output_bits (exports before recipes)
    recipe: str = "custom"
    gptq: bool = False
    upgrade: float = 0.0
    upgrade_qmode: str = "8w"
    calibration: str | None = None  # the calibration file (None: built-in text)
    calibration_sha256: str | None = None
    # fqn -> [qmode, max |W - dequant| / max |W|] of every quantized linear
    tensors: dict[str, list] = field(default_factory=dict)
    # fqn -> mean KL divergence on the calibration text with that linear alone at 4 bits
    sensitivity: dict[str, float] = field(default_factory=dict)
    quantized_linears: int = 0
    float_linears: dict[str, str] = field(default_factory=dict)  # fqn -> why it stayed float
    max_weight_abs_err: float = 0.0


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]  # ModelArgs.to_dict()
    quantization: QuantizationEntry
    programs: dict[str, ProgramEntry]
    files: dict[str, FileEntry]
    seed: int = 0
    dtype: str = "fp32"
    fuse: str = "none"
    sdpa: str = "plain"
    logits: str = "all"
    checkpoint: str | None = None
    checkpoint_layout: str | None = None
    checkpoint_sha256: str | None = None  # of the files the checkpoint was read from
    bundle: BundleEntry | None = None
    switchable: SwitchableEntry | None = None
    bos_id: int = 1
    eos_ids: list[int] = field(default_factory=lambda: [2])
    tokenizer: str | None = None  # the tokenizer.json shipped in the export, if any
    chat_template: str | None = None  # the chat template shipped (chat_template.jinja), if any
    format: str = FORMAT

    @property
    def foundation_sha256(self) -> str | None:
        entry = self.files.get(FOUNDATION_FILE)
        return None if entry is None else entry.sha256

    def to_json(self) -> dict[str, Any]:
        def program(p: ProgramEntry) -> dict:
            d = vars(p).copy()
            for key in ("adapter", "merged_adapter"):
                d[key] = None if d[key] is None else vars(d[key]).copy()
            return d

        sw = self.switchable
        return {
            "format": self.format,
            "model": self.model,
            "quantization": vars(self.quantization).copy(),
            "seed": self.seed,
            "dtype": self.dtype,
            "fuse": self.fuse,
            "sdpa": self.sdpa,
            "logits": self.logits,
            "checkpoint": self.checkpoint,
            "checkpoint_layout": self.checkpoint_layout,
            "checkpoint_sha256": self.checkpoint_sha256,
            "programs": {n: program(p) for n, p in self.programs.items()},
            "bundle": None if self.bundle is None else vars(self.bundle).copy(),
            "switchable": None
            if sw is None
            else {
                **vars(sw),
                "slots": [s.to_dict() for s in sw.slots],
                "template": None if sw.template is None else sw.template.to_dict(),
            },
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "tokenizer": self.tokenizer,
            "chat_template": self.chat_template,
            "files": {n: vars(e).copy() for n, e in self.files.items()},
        }

    @classmethod
    def from_json(cls, d: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Parse a manifest dict; :class:`ProgramError` naming ``source`` and the field if it
        is not one this version wrote."""
        if not isinstance(d, dict):
            raise ProgramError(f"{source}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise ProgramError(
                f"{source}: manifest format {d.get('format')!r} is not {FORMAT!r} (re-export "
                "with this version of edgelora)"
            )
        try:

            def adapter(a):
                return None if a is None else AdapterEntry(**a)

            def program(p):
                halves = {k: adapter(p.get(k)) for k in ("adapter", "merged_adapter")}
                return ProgramEntry(**{**p, **halves})

            sw = d.get("switchable")
            manifest = cls(
                model=dict(d["model"]),
                quantization=QuantizationEntry(**d["quantization"]),
                programs={n: program(p) for n, p in d["programs"].items()},
                files={n: FileEntry(**e) for n, e in d["files"].items()},
                seed=d.get("seed", 0),
                dtype=d.get("dtype", "fp32"),
                fuse=d.get("fuse", "none"),
                sdpa=d.get("sdpa", "plain"),
                logits=d.get("logits", "all"),
                checkpoint=d.get("checkpoint"),
                checkpoint_layout=d.get("checkpoint_layout"),
                checkpoint_sha256=d.get("checkpoint_sha256"),
                bundle=None if d.get("bundle") is None else BundleEntry(**d["bundle"]),
                bos_id=d.get("bos_id", 1),
                eos_ids=list(d.get("eos_ids", [2])),
                tokenizer=d.get("tokenizer"),
                chat_template=d.get("chat_template"),
                switchable=None
                if sw is None
                else SwitchableEntry(
                    **{
                        **sw,
                        "slots": [Slot.from_dict(s) for s in sw["slots"]],
                        "template": None
                        if sw.get("template") is None
                        else TemplateEntry.from_dict(sw["template"]),
                    }
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ProgramError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None
        manifest._check_files(source)
        return manifest

    def _check_files(self, source: str) -> None:
        """Every file name is a plain name in the directory, and every file a record points
        to is listed with its size and sha256: a manifest cannot name ``../x`` or ``/etc``."""
        for name, entry in self.files.items():
            check_file_name(name, f"{source}: file")
            if not (
                isinstance(entry.size, int)
                and entry.size >= 0
                and isinstance(entry.sha256, str)
                and len(entry.sha256) == 64
                and all(c in "0123456789abcdef" for c in entry.sha256)
            ):
                raise ProgramError(f"{source}: file {name!r} has no valid size and sha256")
        if FOUNDATION_FILE not in self.files:
            raise ProgramError(f"{source}: lists no {FOUNDATION_FILE}")
        for what, name in self.named_files():
            if name not in self.files:
                raise ProgramError(f"{source}: {what} {name!r} is not one of the files it lists")

    def named_files(self) -> list[tuple[str, str]]:
        """``(what, file name)`` of every file a record of this manifest points to."""
        named = []
        for n, p in self.programs.items():
            named += [(f"program {n!r}", p.file), (f"program {n!r}'s foundation", p.foundation)]
            if p.template:
                named.append((f"program {n!r}'s template", p.template))
        for rec, what in ((self.bundle, "bundle"), (self.switchable, "switchable program")):
            if rec is not None:
                named += [(what, rec.file), (f"{what}'s foundation", rec.foundation)]
        sw = self.switchable
        if sw is not None:
            named += [(f"adapter {n!r}'s inputs", f) for n, f in sw.adapters.items()]
            if sw.template is not None:
                named.append(("template program", sw.template.file))
        for what, name in (("tokenizer", self.tokenizer), ("chat template", self.chat_template)):
            if name is not None:
                named.append((what, name))
        for what, name in named:
            check_file_name(name, what)
        return named

    def verify(self, directory: str | Path, names: list[str] | None = None) -> None:
        """Check that each of ``names`` (default: every file listed) is a regular file in
        ``directory`` (not a symlink) with the size and sha256 recorded; :class:`ProgramError`
        naming the first that is not."""
        directory = Path(directory)
        for name in self.files if names is None else names:
            entry = self.files.get(name)
            if entry is None:
                raise ProgramError(f"{directory}: {name} is not listed in its manifest")
            path = directory / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise ProgramError(
                    f"{path}: listed in the manifest but missing; re-export"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise ProgramError(f"{path}: not a regular file (a symlink?); re-export")
            if st.st_size != entry.size or sha256_file(path) != entry.sha256:
                raise ProgramError(
                    f"{path} was altered: its sha256 or size is not the one the manifest records; "
                    "re-export"
                )

    @classmethod
    def read(cls, directory: str | Path) -> Manifest | None:
        """The manifest of an export directory, ``None`` if it has none; :class:`ProgramError`
        if it is unreadable."""
        path = Path(directory) / MANIFEST_FILE
        if not os.path.lexists(path):
            return None
        d = read_json(path, ProgramError, "manifest", max_bytes=MAX_MANIFEST_BYTES)
        return cls.from_json(d, str(path))

    def write(self, directory: Path) -> Path:
        """Write ``directory/manifest.json``, atomically: a temporary file, flushed to disk,
        renamed over the old one (a kill leaves the old manifest or the new, never half)."""
        path = directory / MANIFEST_FILE
        _fs.write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return path


def read_export(directory: str | Path, *, verify: bool = True, wait_s: float = 30.0) -> Manifest:
    """The manifest of an export directory, with every file it lists verified (size, sha256,
    a regular file) unless ``verify`` is false; :class:`ProgramError` if there is none or a
    file does not match.

    A writer may swap in a new export meanwhile (:mod:`edgelora.export.output`): a file that
    does not match a manifest that has since changed is read again, for up to ``wait_s``
    seconds. So a reader sees the old export or the new one, never half of each."""
    directory = Path(directory)
    deadline = time.monotonic() + wait_s
    while True:
        manifest = Manifest.read(directory)
        if manifest is None:
            raise ProgramError(f"{directory}: no {MANIFEST_FILE} (not an export_llama directory)")
        if not verify:
            return manifest
        try:
            manifest.verify(directory)
            if Manifest.read(directory) == manifest:
                return manifest
        except ProgramError:
            if time.monotonic() > deadline or Manifest.read(directory) == manifest:
                raise
        time.sleep(0.02)
