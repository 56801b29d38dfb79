"""LoRA adapters in memory, and attaching, detaching and merging them on a ``Transformer``.

An :class:`Adapter` maps module FQNs of this model (``layers.0.attention.wq``) to LoRA weights
in this model's layout (Meta's rotary row order). Reading and writing the on-disk formats (PEFT,
torchtune) lives in :mod:`edgelora.models.adapter_files`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from edgelora.errors import AdapterError
from edgelora.models.fused import (
    FusableProjections,
    LoRAPiece,
    PackedLoRALinear,
    check_pieces,
    split_piece,
)
from edgelora.models.hf import HF_PROJECTIONS
from edgelora.models.lora import LoRALinear

# Hugging Face projection name -> path of the module inside a TransformerBlock.
HF_TO_MODULE = {proj: ours for proj, (_, ours) in HF_PROJECTIONS.items()}
ADAPTER_COMPONENTS = frozenset({"lora_a", "lora_b", "lora_scale"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class LoRAWeights:
    """One adapted projection: ``lora_a`` is ``[rank, in]``, ``lora_b`` is ``[out, rank]``."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class Adapter:
    """A named adapter: model module FQN (e.g. ``layers.0.attention.wq``) -> its weights."""

    name: str
    modules: dict[str, LoRAWeights] = field(default_factory=dict)
    source: str = ""
    scale: float = 1.0  # user multiplier of the whole adapter's contribution
    notes: list[str] = field(default_factory=list)  # what loading adjusted, for the log

    @property
    def num_bytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for w in self.modules.values())


def validate_adapter_name(name: str) -> str:
    """Adapter names become file names: a plain word, no path separators."""
    if not _NAME.match(name) or name in ("base", "foundation", "manifest"):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
            "(not starting with '.' and not 'base', 'foundation' or 'manifest')"
        )
    return name


def random_adapter(
    model: nn.Module,
    name: str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
    std: float = 0.1,
) -> Adapter:
    """A deterministic adapter with non-zero A and B on ``targets`` of every layer (demo/tests).

    ``targets`` are Hugging Face Llama projection names (``q_proj`` ...) or paths inside a
    layer (``attention.wq_a``); by default every projection of the model
    (``model.projections()``).
    """
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=validate_adapter_name(name), source=f"random(seed={seed})")
    paths = [HF_TO_MODULE.get(t, t) for t in (targets or model.projections())]
    for i in range(len(model.layers)):
        for path in paths:
            fqn = f"layers.{i}.{path}"
            lin = model.get_submodule(fqn)
            a = torch.randn(rank, lin.in_features, generator=gen) * std
            b = torch.randn(lin.out_features, rank, generator=gen) * std
            adapter.modules[fqn] = LoRAWeights(a, b, alpha)
    return adapter


def _attach_linear(model: nn.Module, adapter: Adapter, fqn: str, w: LoRAWeights) -> None:
    parent_name, _, leaf = fqn.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = parent._modules.get(leaf)
    if isinstance(base, LoRALinear):
        raise AdapterError(f"adapter {adapter.name!r}: {fqn} already has an adapter attached")
    if not isinstance(base, nn.Linear):
        raise AdapterError(f"adapter {adapter.name!r}: {fqn} is not a linear projection")
    want_a = (w.rank, base.in_features)
    want_b = (base.out_features, w.rank)
    if tuple(w.lora_a.shape) != want_a or tuple(w.lora_b.shape) != want_b:
        raise AdapterError(
            f"adapter {adapter.name!r} ({adapter.source}): {fqn} is "
            f"[{base.out_features} x {base.in_features}] so lora_A must be {list(want_a)} "
            f"and lora_B {list(want_b)}; got {list(w.lora_a.shape)} and {list(w.lora_b.shape)}"
        )
    wrapped = LoRALinear(
        base, rank=w.rank, alpha=w.alpha, use_rslora=w.use_rslora, multiplier=adapter.scale
    )
    with torch.no_grad():
        wrapped.lora_a.weight.copy_(w.lora_a)
        wrapped.lora_b.weight.copy_(w.lora_b)
    setattr(parent, leaf, wrapped)


def _attach_pieces(
    block: FusableProjections, adapter: Adapter, pieces: dict[str, LoRAWeights]
) -> None:
    """Adapter pieces on a block's fusable projections: packed onto the fused layer if the
    block is fused, else split by the declared slices onto the split layers."""
    label = f"adapter {adapter.name!r} ({adapter.source}): {block.fqn}"
    lora_pieces = [
        LoRAPiece(
            block.PIECE_SLICES[name], w.lora_a, w.lora_b, w.alpha, w.use_rslora, adapter.scale
        )
        for name, w in pieces.items()
    ]
    sizes = block.slice_sizes()
    try:
        check_pieces(label, sizes, block.in_features, lora_pieces)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if block.is_fused:
        fused = block._modules[block.FUSED]
        if isinstance(fused, PackedLoRALinear):
            raise AdapterError(f"{label}.{block.FUSED} already has an adapter attached")
        block._modules[block.FUSED] = PackedLoRALinear(
            fused, lora_pieces, module=f"{label}.{block.FUSED}"
        )
        return
    per_slice = {}
    for piece in lora_pieces:
        per_slice.update(split_piece(piece, sizes))
    for name, piece in per_slice.items():
        base = block._modules[name]
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{label}.{name} already has an adapter attached")
        block._modules[name] = piece.to_lora_linear(base)


def attach_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Attach ``adapter`` to ``model`` as LoRA wrappers around its (shared) base linears.

    Plain projections are wrapped in :class:`LoRALinear`. Pieces on fusable projections (``wq``,
    ``wk``, ``wv``; ``w1``, ``w3``; or fused-layout pieces such as ``wqkv``) follow the block's
    declared name->slices mapping: packed onto the fused layer when the block is fused, split by
    rows onto the split layers otherwise. The base is wrapped, not copied (a quantized base stays
    shared). Raises :class:`AdapterError` if a module does not exist or shapes do not fit; on
    error nothing stays attached.
    """
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
    """Fold ``adapter`` into the base weights: ``W += scale * B @ A`` for each adapted linear.

    Do this before quantization (a merged model has no LoRA cost at run time). The merged
    model's outputs equal the unmerged model's up to float rounding.
    """
    attach_adapter(model, adapter)  # validates every module and shape first
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    a = module.scale * module.lora_a.weight.double()
                    b = module.lora_b.weight.double()
                elif isinstance(module, PackedLoRALinear):
                    a = module.stacked_scale().double()[:, None] * module.stacked_a().double()
                    b = module.packed_b().double()
                else:
                    continue
                delta = b @ a
                weight = module.linear.weight
                weight.copy_((weight.double() + delta).to(weight.dtype))
    finally:
        detach_adapters(model)
    return model


def detach_adapters(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear`/:class:`PackedLoRALinear` by the base linear it wraps
    (undoes ``attach_adapter``)."""
    for fqn, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, (LoRALinear, PackedLoRALinear)):
            parent_name, _, leaf = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, module.linear)
    return model


def is_adapter_fqn(fqn: str) -> bool:
    """True for adapter constants: an FQN component is ``lora_a``, ``lora_b`` or ``lora_scale``
    (the per-rank scales of a packed adapter)."""
    return not ADAPTER_COMPONENTS.isdisjoint(fqn.split("."))
