"""An adapter in memory: this model's module FQNs mapped to LoRA weights in its layout.

``layers.0.attention.wq`` -> :class:`LoRAWeights` (Meta's rotary row order). Reading and writing
the on-disk formats (PEFT, torchtune) is :mod:`edgelora.weights.adapter_files`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from edgelora.errors import AdapterError
from edgelora.format.layout import RESERVED_NAMES

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def lora_scale(alpha: float, rank: int, use_rslora: bool = False, multiplier: float = 1.0) -> float:
    """The factor on ``B @ A``: ``multiplier * alpha / rank`` (``/ sqrt(rank)`` with rsLoRA)."""
    return multiplier * alpha / (math.sqrt(rank) if use_rslora else rank)


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

    @property
    def ranks(self) -> list[int]:
        return sorted({w.rank for w in self.modules.values()})


def validate_adapter_name(name: str) -> str:
    """Adapter names become file names: a plain word, no path separators."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
            f"(not starting with '.', at most 64, and none of {', '.join(RESERVED_NAMES)})"
        )
    return name
