"""Attach, detach and merge adapters on a model, and name what is attached.

Attaching wraps base layers (never copies them, so a quantized foundation stays shared by every
adapter): plain projections in :class:`LoRALinear`; pieces on a block's fusable projections
(``wq``/``wk``/``wv``, ``w1``/``w3``, or fused-layout pieces such as ``wqkv``) follow the block's
declared name->slices mapping -- packed onto the fused layer (:class:`PackedLoRALinear`) when the
block runs fused, split by rows onto the split layers otherwise.

Which tensors are the adapter's is read from the wrappers actually attached
(:func:`adapter_fqns`): the quantization filter and the foundation/adapter split of a program
both use it, never a list of name components.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.lora.modules import LoRALinear, LoRAPiece, LoRAWrapper, PackedLoRALinear, check_pieces
from edgelora.lora.record import Adapter, LoRAWeights
from edgelora.models.fused import FusableProjections


def attached(model: nn.Module) -> dict[str, LoRAWrapper]:
    """Every attached adapter wrapper of ``model`` by FQN, in module order."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LoRAWrapper)}


def adapter_fqns(model: nn.Module) -> frozenset[str]:
    """FQNs of the attached adapters' parameters and of their modules (``...wq.lora_a`` and
    ``...wq.lora_a.weight``): everything inside a wrapper but its base layer."""
    out = set()
    for fqn, wrapper in attached(model).items():
        for name, module in wrapper.named_modules():
            if name and name != "linear" and not name.startswith("linear."):
                out.add(f"{fqn}.{name}")
                out.update(f"{fqn}.{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return frozenset(out)


def is_adapter_tensor(fqns: frozenset[str]) -> Callable[[str], bool]:
    """``is_adapter(name)`` for a traced program's constants: ``name`` is in ``fqns``
    (:func:`adapter_fqns`) or inside one of its modules -- a quantized adapter weight is traced
    as its parts (``...wq.lora_a.parametrizations.weight.original0``)."""

    def is_adapter(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in fqns for i in range(len(parts), 0, -1))

    return is_adapter


def dispatch_lora_linear(base: nn.Module, w: LoRAWeights, scale: float) -> LoRAWrapper | None:
    """A plain LoRA adapter on an ``nn.Linear`` (quantized or not): :class:`LoRALinear`."""
    if not isinstance(base, nn.Linear):
        return None
    return LoRALinear.from_base(base, w, multiplier=scale)


# Adapter types, tried in order: the first that returns a wrapper wraps the layer (PEFT's
# ``dispatch_*`` chain). Another type (DoRA, say) is one function added here.
DISPATCHERS: list[Callable[[nn.Module, LoRAWeights, float], LoRAWrapper | None]] = [
    dispatch_lora_linear,
]


def dispatch(base: nn.Module, w: LoRAWeights, scale: float) -> LoRAWrapper | None:
    """The wrapper of the first adapter type that takes ``base``; None if none does."""
    for make in DISPATCHERS:
        wrapper = make(base, w, scale)
        if wrapper is not None:
            return wrapper
    return None


def _attach_linear(model: nn.Module, adapter: Adapter, fqn: str, w: LoRAWeights) -> None:
    parent_name, _, leaf = fqn.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = parent._modules.get(leaf)
    if isinstance(base, LoRAWrapper):
        raise AdapterError(f"adapter {adapter.name!r}: {fqn} already has an adapter attached")
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        want_a, want_b = (w.rank, in_f), (out_f, w.rank)
        if tuple(w.lora_a.shape) != want_a or tuple(w.lora_b.shape) != want_b:
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.source}): {fqn} is [{out_f} x {in_f}] so "
                f"lora_A must be {list(want_a)} and lora_B {list(want_b)}; got "
                f"{list(w.lora_a.shape)} and {list(w.lora_b.shape)}"
            )
    wrapper = dispatch(base, w, adapter.scale)
    if wrapper is None:
        raise AdapterError(
            f"adapter {adapter.name!r}: {fqn} is a {type(base).__name__}, which no adapter type "
            "wraps (a LoRA adapter needs a linear projection)"
        )
    setattr(parent, leaf, wrapper)


def _attach_pieces(
    block: FusableProjections, adapter: Adapter, pieces: dict[str, LoRAWeights]
) -> None:
    """Adapter pieces on a block's fusable projections: packed onto the fused layer if the
    block is fused, else split by the declared slices onto the split layers."""
    label = f"adapter {adapter.name!r} ({adapter.source}): {block.label()}"
    lora_pieces = [
        LoRAPiece.of(block.PIECE_SLICES[name], w, adapter.scale) for name, w in pieces.items()
    ]
    sizes = block.slice_sizes()
    try:
        check_pieces(label, sizes, block.in_features, lora_pieces)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if block.is_fused:
        fused = block._modules[block.FUSED]
        if isinstance(fused, LoRAWrapper):
            raise AdapterError(f"{label}.{block.FUSED} already has an adapter attached")
        block._modules[block.FUSED] = PackedLoRALinear.from_base(
            fused, lora_pieces, module=f"{label}.{block.FUSED}"
        )
        return
    per_slice = {}
    for piece in lora_pieces:
        per_slice.update(piece.split(sizes))
    for name, piece in per_slice.items():
        base = block._modules[name]
        if isinstance(base, LoRAWrapper):
            raise AdapterError(f"{label}.{name} already has an adapter attached")
        block._modules[name] = piece.to_lora_linear(base)


def attach_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Attach ``adapter`` to ``model`` as LoRA wrappers around its (shared) base layers (see
    the module docstring). Raises :class:`AdapterError` if a module does not exist or shapes do
    not fit; on error nothing stays attached."""
    groups: dict[str, dict[str, LoRAWeights]] = {}
    plain: dict[str, LoRAWeights] = {}
    for fqn, w in adapter.modules.items():
        parent_name, _, leaf = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        if isinstance(parent, FusableProjections) and leaf in parent.PIECE_SLICES:
            groups.setdefault(parent_name, {})[leaf] = w
        elif parent is None or not isinstance(parent._modules.get(leaf), nn.Module):
            raise AdapterError(
                f"adapter {adapter.name!r} ({adapter.source}): module {fqn} does not exist in "
                f"this model ({len(model.layers)} layers)"
            )
        else:
            plain[fqn] = w
    try:
        for parent_name, pieces in groups.items():
            _attach_pieces(model.get_submodule(parent_name), adapter, pieces)
        for fqn, w in plain.items():
            _attach_linear(model, adapter, fqn, w)
    except BaseException:
        detach_adapters(model)
        raise
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Replace every attached wrapper by the base layer it wraps (undoes ``attach_adapter``)."""
    for fqn, wrapper in list(attached(model).items()):
        parent_name, _, leaf = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, wrapper.unwrap())
    return model


@contextmanager
def adapter_attached(model: nn.Module, adapter: Adapter | None) -> Iterator[nn.Module]:
    """``with adapter_attached(model, adapter):`` the model with ``adapter`` attached (``None``:
    the base model); every adapter is detached on exit, also on error."""
    if adapter is not None:
        attach_adapter(model, adapter)
    try:
        yield model
    finally:
        detach_adapters(model)


def merge_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Fold ``adapter`` into the base weights: ``W += b @ a`` (float64) for each wrapper's
    :meth:`~LoRAWrapper.delta`. Do this before quantization (a merged model has no LoRA cost at
    run time); the merged model's outputs equal the unmerged model's up to float rounding."""
    attach_adapter(model, adapter)  # validates every module and shape first
    try:
        with torch.no_grad():
            for wrapper in attached(model).values():
                a, b = wrapper.delta(torch.float64)
                weight = wrapper.linear.weight
                weight.copy_((weight.double() + b @ a).to(weight.dtype))
    finally:
        detach_adapters(model)
    return model
