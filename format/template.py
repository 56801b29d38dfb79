"""An adapter-program template: ``NAME.pte`` made by replacing bytes, with no model and no lowering.

``template.pte`` (``export_llama --switchable --adapter-template``) is the switchable program's
twin with every slot's weights as constants: ``linear(x) + B(A x)`` per slot, ``A [rank, in]``
and ``B [out, rank]`` (the adapter's scale folded into ``B``) filled with seeded random values,
so each is a distinct run of bytes in the lowered file. XNNPACK stores a delegated constant
unpacked, under the sha256 of its bytes, and packs it when the program is loaded; so a program
for another adapter with the same slots is ``template.pte`` with, per weight, its bytes written
over the fill's and its key renamed -- then its own checksum written again. The manifest
records where each weight and each occurrence of its key lies (:class:`TemplateEntry`), found
once, after the template is written (:func:`locate_template`).

A patched program computes exactly what the switchable program computes with the same adapter
(the same slots, ranks zero-padded), at the speed of a lowered adapter program: its adapter
weights are constants XNNPACK packs once, not run-time inputs it packs on every call. It can be
made at export time (``--add-to``, from the adapter) or on the device, from the template and
the adapter's ``NAME.lora.safetensors`` (:func:`program_from_inputs`; an int8 file is a quarter
of the fp32 weights).

A patched weight's key is the sha256 of its slot, its part and its bytes (not of the bytes
alone: an adapter that leaves two slots empty has two all-zero weights, and keys must differ).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgelora.errors import InternalError, ProgramError
from edgelora.format.adapter_inputs import Slot, load_adapter_tensors, program_inputs
from edgelora.format.checksums import PROGRAM_SHA_METHOD, restamp

KEY_BYTES = 64  # a sha256 as hex: XNNPACK's named-data key of a constant


@dataclass(frozen=True)
class TemplatePart:
    """One weight of a slot in ``template.pte``: ``part`` is ``"a"`` or ``"b"``; its bytes lie
    at ``offset`` (``size`` bytes), its key at each of ``key_offsets``."""

    module: str
    part: str
    shape: list[int]
    offset: int
    size: int
    key: str
    key_offsets: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TemplateEntry:
    """``template.pte``: its parts in slot order (``a`` then ``b``), the dtype of its adapter
    weights, and where its own checksum lies."""

    file: str
    dtype: str
    parts: list[TemplatePart]
    checksum_offset: int

    def to_dict(self) -> dict:
        return {**vars(self), "parts": [vars(p).copy() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> TemplateEntry:
        return cls(**{**d, "parts": [TemplatePart(**p) for p in d["parts"]]})


def slot_weights(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A switchable program's float ``lora`` inputs (``a_t [1, in, rank]``, ``b_t [1, rank,
    out]`` per slot) as the template's constants (``A [rank, in]``, ``B [out, rank]``)."""
    return [t[0].T.contiguous() for t in inputs]


def template_fill(slots: Sequence[Slot], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """The template's own weights: seeded random, so every one is a distinct run of bytes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for slot in slots:
        for shape in ((slot.rank, slot.in_features), (slot.out_features, slot.rank)):
            out.append((torch.randn(shape, generator=g) * 0.02).to(dtype))
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().flatten().view(torch.uint8).numpy().tobytes()


def _all(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def locate_template(
    path: Path, slots: Sequence[Slot], fill: Sequence[torch.Tensor]
) -> TemplateEntry:
    """Where each weight of ``fill`` (written into the stamped ``path``) and its key lie.
    Raises :class:`InternalError` if a weight is not stored exactly once, unpacked."""
    from edgelora.format.pte import read_pte

    data = path.read_bytes()
    parts = []
    for i, w in enumerate(fill):
        slot, part = slots[i // 2], "ab"[i % 2]
        raw = _bytes(w)
        at = _all(data, raw)
        key = hashlib.sha256(raw).hexdigest()
        keys = _all(data, key.encode())
        if len(at) != 1 or not keys:
            raise InternalError(
                f"{path.name}: {slot.module} weight {part} is stored {len(at)} times and its key "
                f"{len(keys)} times (expected once, and at least once): this ExecuTorch does not "
                "store delegated constants as the template needs"
            )
        parts.append(TemplatePart(slot.module, part, list(w.shape), at[0], len(raw), key, keys))
    own = read_pte(path).constants.get(PROGRAM_SHA_METHOD)
    if own is None or data.count(own) != 1:
        raise InternalError(f"{path.name}: its checksum is not stored exactly once")
    return TemplateEntry(
        path.name, str(fill[0].dtype).removeprefix("torch."), parts, data.find(own)
    )


def patch_template(
    path: Path, entry: TemplateEntry, sha256: str, weights: Sequence[torch.Tensor]
) -> bytes:
    """``path`` (``template.pte``, whose bytes must have sha256 ``sha256``) with ``weights``
    (one per part, in the template's dtype and shapes) in place of its own."""
    data = bytearray(path.read_bytes())
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ProgramError(
            f"{path} was altered (sha256 {found[:16]}..., the manifest records {sha256[:16]}...); "
            "re-export"
        )
    if len(weights) != len(entry.parts):
        raise InternalError(f"{len(weights)} weights for {len(entry.parts)} template parts")
    for p, w in zip(entry.parts, weights, strict=True):
        if list(w.shape) != p.shape or str(w.dtype).removeprefix("torch.") != entry.dtype:
            raise InternalError(
                f"{p.module} weight {p.part}: {tuple(w.shape)} {w.dtype}, the template holds "
                f"{tuple(p.shape)} {entry.dtype}"
            )
        raw = _bytes(w)
        old = bytes(data[p.offset : p.offset + p.size]) if p.offset >= 0 else b""
        if len(raw) != p.size or hashlib.sha256(old).hexdigest() != p.key:
            raise ProgramError(
                f"{path}: the manifest's place for {p.module} weight {p.part} does not hold it; "
                "re-export"
            )
        data[p.offset : p.offset + p.size] = raw
        key = hashlib.sha256(f"{p.module}.{p.part}\0".encode() + raw).hexdigest().encode()
        for at in p.key_offsets:
            if at < 0 or data[at : at + KEY_BYTES] != p.key.encode():
                raise ProgramError(
                    f"{path}: the key of {p.module} weight {p.part} moved; re-export"
                )
            data[at : at + KEY_BYTES] = key
    if not 0 <= entry.checksum_offset <= len(data) - 32:
        raise ProgramError(f"{path}: the manifest's checksum offset is outside the file; re-export")
    return restamp(bytes(data), entry.checksum_offset)


def program_from_inputs(
    template: Path,
    entry: TemplateEntry,
    sha256: str,
    slots: Sequence[Slot],
    inputs: Path,
    stored: torch.dtype,
) -> bytes:
    """The program of the adapter whose switchable inputs are ``inputs`` (adapter dtype
    ``stored``: fp32, fp16 or int8, dequantized as the switchable program does): ``template``
    with them as its weights. What a device can do with the template and a small input file."""
    tensors = load_adapter_tensors(inputs, slots, stored)
    weights = slot_weights(program_inputs(tensors, slots, stored, getattr(torch, entry.dtype)))
    return patch_template(template, entry, sha256, weights)
