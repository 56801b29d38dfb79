"""Adapters as run-time inputs: one program serves every adapter of an export.

A *switchable* program is ``forward(tokens, input_pos, lora)`` (the inputs' format:
:mod:`edgelora.format.adapter_inputs`). Each slot's projection computes
``linear(x) + bmm(bmm(x, a_t), b_t)``; the base linears and everything else stay constants in
the foundation, so a process loads (and XNNPACK packs) the foundation once and switches adapters
by passing other tensors.

Slots are the union of the projections any adapter of the export adapts, each with the largest
rank any adapter uses there; an adapter that adapts fewer projections, or with a smaller rank,
is zero-padded, which adds exactly nothing (``x @ 0 = 0``). The base model is all zeros. Fused
layers are slots like any other: an adapter on ``wq``/``wk``/``wv`` of a fused block is packed
onto ``wqkv`` first (``PackedLoRALinear``), then read out as one ``(a, b)`` pair.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.format.adapter_inputs import Slot, dequantize
from edgelora.lora.attach import adapter_attached, attached
from edgelora.lora.modules import LinearWrapper, LoRAWrapper
from edgelora.lora.record import Adapter


def adapter_slots(model: nn.Module, adapters: Sequence[Adapter]) -> list[Slot]:
    """The slots that fit every adapter in ``adapters`` on ``model`` (in module order)."""
    ranks: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        with adapter_attached(model, adapter):
            for fqn, m in attached(model).items():
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
    model, all zeros), in adapter dtype ``dtype`` (int8: each tensor followed by its scales,
    :func:`quantize_int8`). Raises :class:`AdapterError` if the adapter adapts a projection that has
    no slot or needs a larger rank than its slot."""
    by_fqn = {s.module: s for s in slots}
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with adapter_attached(model, adapter):
        for fqn, m in attached(model).items():
            slot = by_fqn.get(fqn)
            if slot is None or m.rank > slot.rank:
                raise AdapterError(
                    f"adapter {adapter.name!r}: {fqn} (rank {m.rank}) does not fit the "
                    f"switchable program's slots ("
                    + (
                        "the program has no slot for it"
                        if slot is None
                        else f"slot rank {slot.rank}"
                    )
                    + "); a re-export with --switchable and this adapter would fit it "
                    "(--switchable-slots all:RANK reserves room for adapters made later)"
                )
            found[fqn] = m.delta(torch.float32)
    tensors = []
    for slot in slots:
        a_t = torch.zeros(slot.shapes()["a_t"])
        b_t = torch.zeros(slot.shapes()["b_t"])
        if slot.module in found:
            a, b = found[slot.module]
            a_t[0, :, : a.shape[0]] = a.T
            b_t[0, : b.shape[1], :] = b.T
        for t, across in ((a_t, 1), (b_t, 2)):  # one scale per rank component of A and of B
            tensors.extend(quantize_int8(t, across) if dtype == torch.int8 else [t.to(dtype)])
    return tensors


def quantize_int8(t: torch.Tensor, across: int) -> list[torch.Tensor]:
    """``[q, scale]``: ``t`` (float32) as int8 with one symmetric float32 scale per slice along
    dim ``across`` (``t ~ q * scale``; an all-zero slice gets scale 1)."""
    amax = t.abs().amax(dim=across, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
    return [q, scale.to(torch.float32)]


class _SlotInputs:
    """Holds the ``lora`` list of the current forward call for the slot modules to read."""

    def __init__(self, num_slots: int, per_slot: int = 2) -> None:
        self.num_slots = num_slots
        self.per_slot = per_slot  # 2 (a_t, b_t), or 4 with int8 (each with its scale)
        self.tensors: Sequence[torch.Tensor] | None = None


class InputLoRALinear(LinearWrapper):
    """``linear(x) + bmm(bmm(x, a_t), b_t)`` with ``a_t``/``b_t`` taken from the current
    call's inputs (slot ``index``). ``bmm`` (not ``linear``) because XNNPACK delegates a batched
    matmul of two run-time tensors, while its linear wants a constant weight."""

    def __init__(self, linear: nn.Module, inputs: _SlotInputs, index: int) -> None:
        super().__init__()
        self.linear = linear
        self._inputs = inputs
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self._inputs.tensors
        if tensors is None:
            raise RuntimeError(f"adapter slot {self.index} called without lora inputs")
        n = self._inputs.per_slot
        mine = tensors[n * self.index : n * (self.index + 1)]
        a_t, b_t = dequantize(mine[: n // 2], x.dtype), dequantize(mine[n // 2 :], x.dtype)
        if x.dim() == 3 and x.shape[0] == 1:  # the model's [1, seq, dim]: no reshapes, which
            return self.linear(x) + torch.bmm(torch.bmm(x, a_t), b_t)  # would split delegates
        flat = x.reshape(1, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a_t), b_t)
        return self.linear(x) + delta.reshape(*x.shape[:-1], b_t.shape[-1])


class SwitchableModel(nn.Module):
    """``forward(tokens, input_pos, lora)`` over ``model`` with slot modules installed.

    It shares ``model``'s parameter, buffer and submodule tables (the same dicts, not copies),
    so every tensor keeps its FQN -- a switchable program's foundation keys equal the base
    program's -- and ``torch.export`` sees exactly the model's state (functionalising its
    KV-cache writes as usual)."""

    def __init__(self, model: nn.Module, inputs: _SlotInputs) -> None:
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self._modules = model._modules
        object.__setattr__(self, "_model", model)  # not a submodule: its tables are ours
        object.__setattr__(self, "_slot_inputs", inputs)

    def forward(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, lora: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        inputs = self._slot_inputs
        if len(lora) != inputs.per_slot * inputs.num_slots:
            raise ValueError(
                f"expected {inputs.per_slot * inputs.num_slots} lora tensors ({inputs.per_slot} "
                f"per slot), got {len(lora)}"
            )
        inputs.tensors = lora
        try:
            return self._model(tokens, input_pos)
        finally:
            inputs.tensors = None


@contextmanager
def _installed(model: nn.Module, slots: Sequence[Slot], make) -> Iterator[None]:
    """``make(i, base)``'s wrapper at every slot's projection; the plain layers back on exit."""
    installed = []
    try:
        for i, slot in enumerate(slots):
            parent_name, _, leaf = slot.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = parent._modules[leaf]
            if isinstance(base, (LoRAWrapper, InputLoRALinear)):
                raise ValueError(f"{slot.module} already carries an adapter")
            parent._modules[leaf] = make(i, base)
            installed.append((parent, leaf, base))
        yield
    finally:
        for parent, leaf, base in installed:
            parent._modules[leaf] = base


@contextmanager
def switchable(
    model: nn.Module, slots: Sequence[Slot], dtype: torch.dtype = torch.float32
) -> Iterator[SwitchableModel]:
    """``with switchable(model, slots, dtype) as m:`` ``m(tokens, input_pos, lora)`` runs
    ``model`` with an :class:`InputLoRALinear` at every slot, its inputs in adapter dtype
    ``dtype`` (:mod:`edgelora.format.adapter_inputs`); the plain layers are back on exit.
    ``model`` must have no adapter attached."""
    inputs = _SlotInputs(len(slots), 4 if dtype == torch.int8 else 2)
    with _installed(model, slots, lambda i, base: InputLoRALinear(base, inputs, i)):
        yield SwitchableModel(model, inputs)


class SlotLoRALinear(LoRAWrapper):
    """``linear(x) + lora_b(lora_a(x))``: a slot's adapter as constants, its scale folded into
    ``lora_b`` -- the form of a template program (:mod:`edgelora.format.template`)."""

    def __init__(self, linear: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.lora_a = nn.Linear(a.shape[1], a.shape[0], bias=False, device="meta")
        self.lora_a.weight = nn.Parameter(a, requires_grad=False)
        self.lora_b = nn.Linear(b.shape[1], b.shape[0], bias=False, device="meta")
        self.lora_b.weight = nn.Parameter(b, requires_grad=False)

    @property
    def rank(self) -> int:
        return self.lora_a.out_features

    def delta(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_a.weight.detach().to(dtype), self.lora_b.weight.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora_b(self.lora_a(x))


@contextmanager
def slot_constants(
    model: nn.Module, slots: Sequence[Slot], weights: Sequence[torch.Tensor]
) -> Iterator[nn.Module]:
    """``with slot_constants(model, slots, weights):`` ``model`` with a :class:`SlotLoRALinear`
    at every slot, ``weights`` holding ``A [rank, in]`` then ``B [out, rank]`` per slot."""
    with _installed(
        model, slots, lambda i, base: SlotLoRALinear(base, weights[2 * i], weights[2 * i + 1])
    ):
        yield model
