"""Adapters as run-time inputs: one program serves every adapter of an export.

A *switchable* program is ``forward(tokens, input_pos, lora)`` where ``lora`` is a list of
tensors, two per adapted projection ("slot"): ``a_t [1, in, rank]`` and ``b_t [1, rank, out]``
with the adapter's scale folded into ``b_t``. Each slot's projection computes
``linear(x) + bmm(bmm(x, a_t), b_t)``; the base linears and everything else stay constants in
the foundation, so a process loads (and XNNPACK packs) the foundation once and switches
adapters by passing other tensors -- no second program, no second copy of the packed weights.

Slots are the union of the projections any adapter of the export adapts, each with the largest
rank any adapter uses there; an adapter that adapts fewer projections, or with a smaller rank,
is zero-padded, which adds exactly nothing (``x @ 0 = 0``). The base model is all zeros.
Fused layers are slots like any other: an adapter on ``wq``/``wk``/``wv`` of a fused block is
packed onto ``wqkv`` first (``PackedLoRALinear``), then read out as one ``(a, b)`` pair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.models.adapters import Adapter, adapter_attached
from edgelora.models.fused import PackedLoRALinear
from edgelora.models.lora import LinearWrapper, LoRALinear


@dataclass(frozen=True)
class Slot:
    """One adapted projection of a switchable program: ``module`` is its FQN."""

    module: str
    in_features: int
    out_features: int
    rank: int

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Slot:
        return cls(str(d["module"]), int(d["in"]), int(d["out"]), int(d["rank"]))


def _effective_lora(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [r, in], b [out, r])`` of an attached LoRA wrapper with every scale folded into
    ``b``, so the module's delta is ``x @ a.T @ b.T``."""
    if isinstance(module, LoRALinear):
        a = module.lora_a.weight.detach().float()
        return a, module.lora_b.weight.detach().float() * module.scale
    if isinstance(module, PackedLoRALinear):
        a = module.stacked_a().detach().float()
        return a, module.packed_b().float() * module.stacked_scale().float()[None, :]
    raise TypeError(f"not a LoRA wrapper: {type(module).__name__}")


def _attached_loras(model: nn.Module) -> dict[str, nn.Module]:
    return {
        fqn: m for fqn, m in model.named_modules() if isinstance(m, (LoRALinear, PackedLoRALinear))
    }


def adapter_slots(model: nn.Module, adapters: Sequence[Adapter]) -> list[Slot]:
    """The slots that fit every adapter in ``adapters`` on ``model`` (in module order)."""
    ranks: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        with adapter_attached(model, adapter):
            for fqn, m in _attached_loras(model).items():
                ranks[fqn] = max(ranks.get(fqn, 0), m.rank)
                shapes[fqn] = (m.in_features, m.out_features)
    order = [fqn for fqn, _ in model.named_modules()]
    return [Slot(f, *shapes[f], ranks[f]) for f in sorted(ranks, key=order.index)]


def adapter_tensors(
    model: nn.Module,
    adapter: Adapter | None,
    slots: Sequence[Slot],
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """The ``lora`` input list of a switchable program for ``adapter`` (``None``: the base
    model, all zeros). Raises :class:`AdapterError` if the adapter adapts a projection that has
    no slot or needs a larger rank than its slot."""
    by_fqn = {s.module: s for s in slots}
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with adapter_attached(model, adapter):
        for fqn, m in _attached_loras(model).items():
            slot = by_fqn.get(fqn)
            a, b = _effective_lora(m)
            if slot is None or a.shape[0] > slot.rank:
                raise AdapterError(
                    f"adapter {adapter.name!r}: {fqn} (rank {a.shape[0]}) does not fit the "
                    f"switchable program's slots ("
                    + ("no slot" if slot is None else f"slot rank {slot.rank}")
                    + "); re-export with this adapter"
                )
            found[fqn] = (a, b)
    tensors = []
    for slot in slots:
        a_t = torch.zeros(1, slot.in_features, slot.rank, dtype=dtype)
        b_t = torch.zeros(1, slot.rank, slot.out_features, dtype=dtype)
        if slot.module in found:
            a, b = found[slot.module]
            a_t[0, :, : a.shape[0]] = a.T
            b_t[0, : b.shape[1], :] = b.T
        tensors.extend((a_t, b_t))
    return tensors


def tensor_names(slots: Sequence[Slot]) -> list[str]:
    """Names of the ``lora`` inputs in order (the keys of an adapter's tensor file)."""
    return [f"{s.module}.{part}" for s in slots for part in ("a_t", "b_t")]


def save_adapter_tensors(path, tensors: Sequence[torch.Tensor], slots: Sequence[Slot]) -> None:
    """Write one adapter's ``lora`` inputs as safetensors (keys :func:`tensor_names`)."""
    from safetensors.torch import save_file

    names = tensor_names(slots)
    save_file({n: t.contiguous() for n, t in zip(names, tensors, strict=True)}, str(path))


def load_adapter_tensors(path, slots: Sequence[Slot]) -> list[torch.Tensor]:
    """Read an adapter's ``lora`` inputs back, checking every key and shape against the slots.
    Raises :class:`AdapterError` naming the file and the first mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        found = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path}: cannot read adapter tensors ({e})") from None
    out = []
    for slot in slots:
        want = {"a_t": (1, slot.in_features, slot.rank), "b_t": (1, slot.rank, slot.out_features)}
        for part, shape in want.items():
            key = f"{slot.module}.{part}"
            t = found.get(key)
            if t is None:
                raise AdapterError(f"{path}: missing tensor {key}")
            if tuple(t.shape) != shape:
                raise AdapterError(
                    f"{path}: {key} has shape {list(t.shape)}, the program's slot needs "
                    f"{list(shape)}"
                )
            out.append(t)
    extra = set(found) - set(tensor_names(slots))
    if extra:
        raise AdapterError(f"{path}: tensors the program has no slot for: {sorted(extra)[:3]}")
    return out


class LoRAInputs:
    """Holds the ``lora`` list of the current forward call for the slot modules to read."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.tensors: Sequence[torch.Tensor] | None = None

    def set(self, tensors: Sequence[torch.Tensor] | None) -> None:
        if tensors is not None and len(tensors) != 2 * self.num_slots:
            raise ValueError(
                f"expected {2 * self.num_slots} lora tensors (2 per slot), got {len(tensors)}"
            )
        self.tensors = tensors


class InputLoRALinear(LinearWrapper):
    """``linear(x) + bmm(bmm(x, a_t), b_t)`` with ``a_t``/``b_t`` taken from the current
    call's inputs (slot ``index``). ``bmm`` (not ``linear``) because XNNPACK delegates a batched
    matmul of two run-time tensors, while its linear wants a constant weight."""

    def __init__(self, linear: nn.Module, inputs: LoRAInputs, index: int) -> None:
        super().__init__()
        self.linear = linear
        self._inputs = inputs
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self._inputs.tensors
        if tensors is None:
            raise RuntimeError(f"adapter slot {self.index} called without lora inputs")
        a_t, b_t = tensors[2 * self.index], tensors[2 * self.index + 1]
        if x.dim() == 3 and x.shape[0] == 1:  # the model's [1, seq, dim]: no reshapes, which
            return self.linear(x) + torch.bmm(torch.bmm(x, a_t), b_t)  # would split delegates
        flat = x.reshape(1, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a_t), b_t)
        return self.linear(x) + delta.reshape(*x.shape[:-1], b_t.shape[-1])


@contextmanager
def switchable(model: nn.Module, slots: Sequence[Slot]) -> Iterator[nn.Module]:
    """``with switchable(model, slots):`` the model takes ``forward(tokens, input_pos, lora)``
    with an :class:`InputLoRALinear` at every slot; the plain linears are back on exit. The
    module tree keeps its FQNs (no wrapper module), so a switchable program's foundation keys
    equal the base program's. ``model`` must have no adapter attached."""
    if model.lora_inputs is not None:
        raise ValueError("adapter slots are already installed")
    inputs = LoRAInputs(len(slots))
    installed = []
    try:
        for i, slot in enumerate(slots):
            parent_name, _, leaf = slot.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = parent._modules[leaf]
            if isinstance(base, (LoRALinear, PackedLoRALinear)):
                raise ValueError(f"{slot.module} already carries an adapter")
            parent._modules[leaf] = InputLoRALinear(base, inputs, i)
            installed.append((parent, leaf, base))
        model.lora_inputs = inputs
        yield model
    finally:
        model.lora_inputs = None
        for parent, leaf, base in installed:
            parent._modules[leaf] = base
