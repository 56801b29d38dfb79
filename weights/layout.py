"""Checkpoint tensors in either projection layout: split (``wq``/``wk``/``wv``) or fused (``wqkv``).

A checkpoint is converted to the layout the model has, never the other way round (the model's
layout is its config's, then the ``--fuse`` transform's): fused rows are split by the block's
declared slice sizes, split weights are concatenated in ``SPLIT`` order -- both bit-exact. Each
block records the layout its checkpoint had (``checkpoint_fused``), which
:func:`edgelora.lora.fusion.restore_checkpoint_fusion_state` returns to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from edgelora.models.args import ModelArgs
from edgelora.models.fused import FusableProjections


def fuse_rows(
    sd: dict[str, torch.Tensor], prefix: str, fused: str, sizes: Mapping[str, int]
) -> None:
    """Replace ``prefix.<piece>.weight`` (and ``.bias``) of every piece in ``sizes`` by
    ``prefix.<fused>.weight`` (their rows concatenated in order), in place; ``ValueError``
    naming the keys otherwise."""
    present = [n for n in sizes if f"{prefix}.{n}.weight" in sd]
    for name, rows in sizes.items():
        key = f"{prefix}.{name}.weight"
        if key not in sd:
            raise ValueError(
                f"{prefix}: has {', '.join(present)} but no {name}.weight to fuse into {fused}"
            )
        if sd[key].shape[0] != rows:
            raise ValueError(
                f"{key} has {sd[key].shape[0]} rows, expected {rows} (sizes {dict(sizes)})"
            )
    for kind in ("weight", "bias"):
        keys = [f"{prefix}.{n}.{kind}" for n in sizes]
        if kind == "weight" or any(k in sd for k in keys):
            sd[f"{prefix}.{fused}.{kind}"] = torch.cat([sd.pop(k) for k in keys])


def split_rows(
    sd: dict[str, torch.Tensor], prefix: str, fused: str, sizes: Mapping[str, int]
) -> None:
    """Inverse of :func:`fuse_rows` (copies, bit-exact); ``ValueError`` if the rows do not add
    up."""
    key = f"{prefix}.{fused}.weight"
    if sd[key].shape[0] != sum(sizes.values()):
        raise ValueError(
            f"{key} has {sd[key].shape[0]} rows, expected {sum(sizes.values())} = "
            f"{' + '.join(f'{n} {s}' for n, s in sizes.items())}"
        )
    for kind in ("weight", "bias"):
        t = sd.pop(f"{prefix}.{fused}.{kind}", None)
        if t is None:
            continue
        for name, rows in zip(sizes, t.split(list(sizes.values()), dim=0), strict=True):
            sd[f"{prefix}.{name}.{kind}"] = rows.clone()


def to_model_layout(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Convert ``sd`` (in place) to the layout each fusable block of ``model`` has, record each
    block's ``checkpoint_fused``, and return what was converted, for the log. ``ValueError``
    naming the key for rows that do not fit the block."""
    converted: dict[tuple[str, str], int] = {}
    for fqn, block in model.named_modules():
        if not isinstance(block, FusableProjections) or not block.fusable:
            continue
        block.checkpoint_fused = f"{fqn}.{block.FUSED}.weight" in sd
        if block.checkpoint_fused == block.is_fused:
            continue
        sizes = block.slice_sizes()
        if block.is_fused:
            if not any(f"{fqn}.{n}.weight" in sd for n in block.SPLIT):
                continue  # neither layout: the strict load names the missing keys
            fuse_rows(sd, fqn, block.FUSED, sizes)
            how = (f"split {'/'.join(block.SPLIT)}", f"fused {block.FUSED}")
        else:
            split_rows(sd, fqn, block.FUSED, sizes)
            how = (f"fused {block.FUSED}", f"split {'/'.join(block.SPLIT)}")
        converted[how] = converted.get(how, 0) + 1
    return [f"converted {n} layer(s) from {a} to {b}" for (a, b), n in converted.items()]


_MLA_KEY = re.compile(r"^(layers\.\d+\.attention)\.(wq_a|wkv_a|wq_kv_a)\.weight$")


def _mla_sizes(args: ModelArgs) -> dict[str, int]:
    if not (args.is_mla and args.q_lora_rank):
        raise ValueError(
            "MLA checkpoint conversion needs attention_type='mla' and q_lora_rank > 0 "
            f"(got attention_type={args.attention_type!r}, q_lora_rank={args.q_lora_rank})"
        )
    return {"wq_a": args.q_lora_rank, "wkv_a": args.kv_lora_rank + args.qk_rope_head_dim}


def _mla_prefixes(sd: Mapping[str, torch.Tensor], fused: bool) -> list[str]:
    out = []
    for key in sd:
        m = _MLA_KEY.match(key)
        if m is not None and (m.group(2) == "wq_kv_a") == fused and m.group(1) not in out:
            out.append(m.group(1))
    return out


def mla_state_dict_to_fused(
    sd: dict[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """An MLA state dict in the fused layout: each layer's ``wq_a`` and ``wkv_a`` rows
    concatenated (in that order) into ``wq_kv_a``. Already-fused layers are kept; a layer with
    only one of the two, or with the wrong row counts, is a ``ValueError`` naming the keys."""
    sizes, out = _mla_sizes(args), dict(sd)
    for prefix in _mla_prefixes(sd, fused=False):
        fuse_rows(out, prefix, "wq_kv_a", sizes)
    return out


def mla_state_dict_to_split(
    sd: dict[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mla_state_dict_to_fused`: ``wq_kv_a`` rows split into ``wq_a`` and
    ``wkv_a`` (copies, bit-exact). ``ValueError`` if a fused weight's rows do not add up."""
    sizes, out = _mla_sizes(args), dict(sd)
    for prefix in _mla_prefixes(sd, fused=True):
        split_rows(out, prefix, "wq_kv_a", sizes)
    return out
