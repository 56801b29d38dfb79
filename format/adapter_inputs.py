"""A switchable program's adapter slots, and the files holding each adapter's run-time inputs.

``switchable.pte`` is ``forward(tokens, input_pos, lora)`` where ``lora`` holds, per slot (one
adapted projection), ``a_t [1, in, rank]`` and ``b_t [1, rank, out]``, the adapter's scale
folded into ``b_t``, in the export's adapter dtype (``--adapter-dtype``): float32, float16, or
int8 with one float32 scale per rank component (``a_t.scale [1, 1, rank]``,
``b_t.scale [1, rank, 1]``; symmetric, so ``w = q * scale``).
``NAME.lora.safetensors`` stores one adapter's list under the keys :func:`tensor_names`,
compact (only the slots it uses, at its own ranks: its bytes are its parameters', however much
room the slots reserve); the slots and the dtype are recorded in the manifest. The program
takes its inputs in its compute dtype (the manifest's ``program_dtype``): a process converts an
adapter's stored tensors once, when it switches to it (:func:`program_inputs`), so a smaller
file costs no decode speed. (Exports made before ``program_dtype`` existed take their inputs
in the stored dtype.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgelora.errors import AdapterError


@dataclass(frozen=True)
class Slot:
    """One adapted projection of a switchable program: ``module`` is its FQN."""

    module: str
    in_features: int
    out_features: int
    rank: int

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"a_t": (1, self.in_features, self.rank), "b_t": (1, self.rank, self.out_features)}

    def parts(self, dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple, torch.dtype]]:
        """The slot's inputs in order, name -> (shape, dtype), for adapter dtype ``dtype``."""
        if dtype != torch.int8:
            return {n: (shape, dtype) for n, shape in self.shapes().items()}
        a, b = self.shapes()["a_t"], self.shapes()["b_t"]
        return {
            "a_t": (a, torch.int8),
            "a_t.scale": ((1, 1, a[2]), torch.float32),
            "b_t": (b, torch.int8),
            "b_t.scale": ((1, b[1], 1), torch.float32),
        }

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Slot:
        """A slot as a manifest records it; ``ValueError`` naming a field that is not a module
        name or a size in range (a hostile manifest must not allocate terabytes)."""
        module = d["module"]
        if not isinstance(module, str) or not _MODULE.fullmatch(module):
            raise ValueError(f"slot module {module!r} is not a module name")
        sizes = [d["in"], d["out"], d["rank"]]
        for key, value in zip(("in", "out", "rank"), sizes, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_DIM:
                raise ValueError(f"slot {module}: {key!r} {value!r} is not in 1..{MAX_DIM}")
        return cls(module, *sizes)


MAX_DIM = 1 << 18  # a slot's width or rank; far above any model's (and 2^36 elements at most)
_MODULE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){0,15}")

ADAPTER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def tensor_names(slots: Sequence[Slot], dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the ``lora`` inputs in order (the keys of an adapter's tensor file)."""
    return [f"{s.module}.{part}" for s in slots for part in s.parts(dtype)]


def zero_inputs(slots: Sequence[Slot], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The ``lora`` inputs of no adapter (the base model): zeros (scales of one)."""
    return [
        (torch.ones if name.endswith(".scale") else torch.zeros)(shape, dtype=dt)
        for s in slots
        for name, (shape, dt) in s.parts(dtype).items()
    ]


def dequantize(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One stored input (``[t]``, or int8 ``[q, scale]``) in dtype ``dtype``: a cast, or
    ``q * scale`` -- in a program's graph and when a process converts at switch time alike."""
    if len(parts) == 2:
        return parts[0].to(dtype) * parts[1].to(dtype)
    return parts[0] if parts[0].dtype == dtype else parts[0].to(dtype)


def program_inputs(
    tensors: Sequence[torch.Tensor], slots: Sequence[Slot], stored: torch.dtype, to: torch.dtype
) -> list[torch.Tensor]:
    """An adapter's stored ``lora`` tensors (adapter dtype ``stored``) as inputs of a program
    that takes dtype ``to`` (:func:`dequantize` of each)."""
    if stored == to:
        return list(tensors)
    n = 2 if stored == torch.int8 else 1  # tensors per input
    if len(tensors) != 2 * n * len(slots):
        raise ValueError(f"expected {2 * n} tensors per slot, got {len(tensors)} for {len(slots)}")
    return [dequantize(tensors[i : i + n], to) for i in range(0, len(tensors), n)]


# The axis of each stored part that runs over the rank components.
_RANK_AXIS = {"a_t": 2, "b_t": 1, "a_t.scale": 2, "b_t.scale": 1}


def save_adapter_tensors(
    path, tensors: Sequence[torch.Tensor], slots: Sequence[Slot], dtype: torch.dtype = torch.float32
) -> None:
    """Write one adapter's ``lora`` inputs as safetensors (keys :func:`tensor_names`), compact:
    a slot's trailing rank components that are zero in both ``a_t`` and ``b_t`` (the padding up
    to the slot's rank) are left out, and so is a slot the adapter does not use -- the file holds
    the adapter's own parameters, however much room the slots reserve. Exact: a rank component
    with a zero ``a_t`` column or a zero ``b_t`` row adds nothing. :func:`load_adapter_tensors`
    pads them back."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    at = 0
    for slot in slots:
        names = slot.parts(dtype)
        parts = dict(zip(names, tensors[at : at + len(names)], strict=True))
        at += len(names)
        used = (parts["a_t"][0] != 0).any(0) | (parts["b_t"][0] != 0).any(1)
        if not bool(used.any()):
            continue  # a slot the adapter does not use
        rank = int(used.nonzero().max()) + 1
        for part, t in parts.items():
            out[f"{slot.module}.{part}"] = t.narrow(_RANK_AXIS[part], 0, rank).contiguous()
    if at != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {at} slot inputs")
    save_file(out, str(path))


def load_adapter_tensors(
    path: str | Path, slots: Sequence[Slot], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Read an adapter's ``lora`` inputs back as the program's full list: every slot the file
    leaves out is zeros (scales of one), every rank up to the slot's zero-padded. Checks every
    key, shape and dtype against the slots; raises :class:`AdapterError` naming the file and
    the first mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        found = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path}: cannot read adapter tensors ({e})") from None
    out = []
    for slot in slots:
        parts = slot.parts(dtype)
        keys = {part: f"{slot.module}.{part}" for part in parts}
        present = [k for k in keys.values() if k in found]
        for part, key in keys.items():
            if key in found and found[key].dtype != parts[part][1]:
                raise AdapterError(
                    f"{path}: {key} is {str(found[key].dtype).removeprefix('torch.')}, the "
                    f"program takes {str(parts[part][1]).removeprefix('torch.')}"
                )
        if present and len(present) != len(keys):
            missing = next(k for k in keys.values() if k not in found)
            raise AdapterError(f"{path}: missing tensor {missing}")
        ranks = set()
        for part, (shape, dt) in parts.items():
            full = (torch.ones if part.endswith(".scale") else torch.zeros)(shape, dtype=dt)
            t = found.get(keys[part])
            if t is None:
                out.append(full)
                continue
            axis = _RANK_AXIS[part]
            rank = t.shape[axis] if t.dim() == len(shape) else -1
            want = list(shape)
            want[axis] = rank
            if tuple(t.shape) != tuple(want) or not 0 < rank <= slot.rank:
                raise AdapterError(
                    f"{path}: {keys[part]} has shape {list(t.shape)}, the program's slot needs "
                    f"{list(shape)} (its rank at most {slot.rank})"
                )
            ranks.add(rank)
            full.narrow(axis, 0, rank).copy_(t)
            out.append(full)
        if len(ranks) > 1:
            raise AdapterError(
                f"{path}: {slot.module}'s tensors disagree on its rank {sorted(ranks)}"
            )
    extra = set(found) - set(tensor_names(slots, dtype))
    if extra:
        raise AdapterError(f"{path}: tensors the program has no slot for: {sorted(extra)[:3]}")
    return out
