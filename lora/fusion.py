"""Fusion as a model transform: run projections that share an input as one matmul, adapters kept.

Every change of a block's layout after the model is built goes through this module: the
``--fuse`` setting (:func:`set_fusion`), the seeds' API (:func:`fuse_qkv_projections`,
:func:`fuse_gate_up_projections`, :func:`fuse_mla_projections`, their ``unfuse_*``, each with
``inplace``), and :func:`restore_checkpoint_fusion_state`. Adapters attached to the pieces are
packed onto the fused layer (:class:`PackedLoRALinear`) and split back when unfusing, exactly.
It is LoRA-aware by design, which is why it lives with the wrappers.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from edgelora.lora.modules import LoRALinear, LoRAPiece, LoRAWrapper, PackedLoRALinear
from edgelora.models.fused import FusableProjections, FusedLinear
from edgelora.models.llama import Attention, FeedForward
from edgelora.models.mla import MLAttention

FUSE_MODES = ("none", "qkv", "gate_up", "mla", "all")


def fuse_modules(parts: Mapping[str, nn.Module], *, module: str = "") -> nn.Module:
    """Fuse split projections (plain ``nn.Linear`` or :class:`LoRALinear`) into one layer;
    adapters on the pieces are packed onto it (a :class:`PackedLoRALinear`)."""
    bases = {n: m.unwrap() if isinstance(m, LoRAWrapper) else m for n, m in parts.items()}
    for name, base in bases.items():
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{module}.{name}: cannot fuse a {type(base).__name__}")
    fused = FusedLinear.from_linears(bases)
    pieces = [
        LoRAPiece.from_lora_linear(n, m) for n, m in parts.items() if isinstance(m, LoRALinear)
    ]
    return PackedLoRALinear.from_base(fused, pieces, module=module) if pieces else fused


def unfuse_module(fused: nn.Module) -> dict[str, nn.Module]:
    """Split a fused layer back into per-slice layers; packed adapters become per-slice
    :class:`LoRALinear` wrappers (a piece spanning several slices is split by rows, exactly)."""
    base = fused.unwrap() if isinstance(fused, PackedLoRALinear) else fused
    parts: dict[str, nn.Module] = dict(base.unfuse())
    if isinstance(fused, PackedLoRALinear):
        for piece in fused.pieces():
            for name, part in piece.split(base.output_sizes).items():
                parts[name] = part.to_lora_linear(parts[name])
    return parts


def fuse_block(block: FusableProjections, inplace: bool = False) -> None:
    """Run ``block``'s split projections as one fused layer (adapters on them are packed).

    ``inplace=True`` deletes the split layers (their memory is freed); ``inplace=False`` keeps
    them, so :func:`unfuse_block` restores them untouched (same storage). Idempotent."""
    if not block.fusable:
        raise ValueError(
            f"{block.label()}: cannot fuse wq_a and wkv_a: q_lora_rank is 0 (the query uses "
            "a plain wq)"
        )
    if not block.is_fused:
        parts = {name: block._modules[name] for name in block.SPLIT}
        block.add_module(block.FUSED, fuse_modules(parts, module=block.label()))
    if inplace:
        for name in block.SPLIT:
            block._modules.pop(name, None)


def unfuse_block(block: FusableProjections) -> None:
    """Back to split layers: the kept ones if :func:`fuse_block` kept them, else new ones
    holding the fused rows, with packed adapters split back. Idempotent."""
    if not block.is_fused:
        return
    fused = block._modules.pop(block.FUSED)
    if all(name in block._modules for name in block.SPLIT):
        kept_plain = not any(isinstance(block._modules[n], LoRALinear) for n in block.SPLIT)
        if isinstance(fused, PackedLoRALinear) and kept_plain:
            # Adapters attached after fusing: split them back onto the kept layers.
            for piece in fused.pieces():
                for name, part in piece.split(fused.output_sizes).items():
                    block._modules[name] = part.to_lora_linear(block._modules[name])
        return
    for name, module in unfuse_module(fused).items():
        block.add_module(name, module)


def _blocks(model: nn.Module, kind: type) -> list[FusableProjections]:
    return [m for m in model.modules() if isinstance(m, kind)]


# Which blocks each kind of fusion touches, and what a model without them is told.
_KINDS: dict[str, tuple[type, str]] = {
    "qkv": (Attention, "an MLA model has no wq/wk/wv to fuse (use fuse_mla_projections)"),
    "gate_up": (FeedForward, "the model has no w1/w3"),
    "mla": (
        MLAttention,
        "the model uses attention_type='gqa', which has no wq_a/wkv_a (use fuse_qkv_projections)",
    ),
}


def fuse(model: nn.Module, kind: str, inplace: bool = False) -> None:
    """Fuse every block of ``kind`` (``qkv``: ``wq``/``wk``/``wv`` -> ``wqkv``; ``gate_up``:
    ``w1``/``w3`` -> ``w13``; ``mla``: ``wq_a``/``wkv_a`` -> ``wq_kv_a``); see
    :func:`fuse_block`. ``ValueError`` if the model has no such blocks."""
    cls, missing = _KINDS[kind]
    blocks = _blocks(model, cls)
    if not blocks:
        raise ValueError(f"fuse_{kind}_projections: {missing}")
    for block in blocks:
        fuse_block(block, inplace)


def unfuse(model: nn.Module, kind: str) -> None:
    """Split every block of ``kind`` back (see :func:`unfuse_block`)."""
    for block in _blocks(model, _KINDS[kind][0]):
        unfuse_block(block)


# The seeds' API (diffusers' fuse_qkv_projections and friends), as functions of the model.
def fuse_qkv_projections(model: nn.Module, inplace: bool = False) -> None:
    fuse(model, "qkv", inplace)


def fuse_gate_up_projections(model: nn.Module, inplace: bool = False) -> None:
    fuse(model, "gate_up", inplace)


def fuse_mla_projections(model: nn.Module, inplace: bool = False) -> None:
    fuse(model, "mla", inplace)


def unfuse_qkv_projections(model: nn.Module) -> None:
    unfuse(model, "qkv")


def unfuse_gate_up_projections(model: nn.Module) -> None:
    unfuse(model, "gate_up")


def unfuse_mla_projections(model: nn.Module) -> None:
    unfuse(model, "mla")


def restore_checkpoint_fusion_state(model: nn.Module) -> None:
    """Put every block back in the layout its checkpoint had (``checkpoint_fused``): a natively
    fused checkpoint's blocks fused, a split one's split.

    Call it before attaching an adapter trained on the checkpoint's layout after fusing or
    unfusing for speed, and before saving a state dict meant to match the checkpoint."""
    for block in _blocks(model, FusableProjections):
        if block.checkpoint_fused:
            fuse_block(block, inplace=True)
        else:
            unfuse_block(block)


def set_fusion(model: nn.Module, fuse_mode: str) -> None:
    """``--fuse``: fuse Q/K/V (``qkv``), gate/up (``gate_up``), MLA's wq_a/wkv_a (``mla``) or
    all that the model has (``all``) in place (the split weights are freed). Q/K/V and gate/up
    not named are split, whatever layout the checkpoint had; MLA not named keeps the layout its
    config asks for (``fused_mla_lora_proj``)."""
    if fuse_mode not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse_mode!r}")
    wanted = {"qkv", "gate_up", "mla"} if fuse_mode == "all" else {fuse_mode}
    mla = _blocks(model, MLAttention)
    for kind, (cls, _) in _KINDS.items():
        blocks = _blocks(model, cls)
        if kind in wanted and blocks and all(b.fusable for b in blocks):
            fuse(model, kind, inplace=True)
        elif kind != "mla" and not (kind == "qkv" and mla):
            unfuse(model, kind)
