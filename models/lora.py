"""``LoRALinear``: a LoRA adapter wrapped around an ordinary ``nn.Linear``.

The base projection stays a plain ``nn.Linear`` submodule named ``linear``, so quantizers
(torchao ``quantize_``) see and rewrite it like any other linear, while ``lora_a``/``lora_b``
are separate ``nn.Linear`` modules a quantization filter can exclude by FQN.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearWrapper(nn.Module):
    """A module around a base ``nn.Linear`` named ``linear`` that answers for it:
    ``in_features``, ``out_features``, ``weight`` and ``bias`` are the wrapped linear's, and
    around a fused layer (``FusedLinear``) so are ``output_sizes`` and ``split``."""

    linear: nn.Linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def output_sizes(self) -> dict[str, int]:
        return self.linear.output_sizes

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear.split(y)


class LoRALinear(LinearWrapper):
    """``y = linear(x) + scale * lora_b(lora_a(x))`` with ``scale = alpha / rank``.

    Args:
        linear: the base projection (``in_features -> out_features``); wrapped, not copied.
        rank: LoRA rank ``r`` (> 0).
        alpha: LoRA alpha.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        multiplier: a user factor on the whole contribution (``--lora NAME=DIR:scale=S``).

    ``weight``/``bias`` return the wrapped linear's, so code that treats this module as a linear
    keeps working. Loading a state dict in the pre-wrapping layout (``<prefix>.weight``) remaps
    the keys onto ``<prefix>.linear.weight``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.linear = linear
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.multiplier = float(multiplier)
        self.scale = multiplier * self.alpha / (math.sqrt(rank) if use_rslora else rank)
        weight = linear.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.lora_a = nn.Linear(linear.in_features, rank, bias=False, dtype=dtype)
        self.lora_b = nn.Linear(rank, linear.out_features, bias=False, dtype=dtype)
        # PEFT's default init: A random, B zero, so a fresh adapter is the identity.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.scale * self.lora_b(self.lora_a(x))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before wrapping store the base weight as `<prefix>.weight`.
        for attr in ("weight", "bias"):
            old_key, new_key = prefix + attr, prefix + "linear." + attr
            if old_key in state_dict and new_key not in state_dict:
                state_dict[new_key] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"
