"""Fused projections: one matmul for several projections that read the same input.

A :class:`FusedLinear` is one ``nn.Linear`` whose output rows are named slices (``wq``, ``wk``,
``wv`` with their GQA sizes; ``w1``, ``w3``), so one matmul replaces several and the 8da4w filter
quantizes it like any linear. A block whose projections can run fused is a
:class:`FusableProjections`: it declares its split layers (``SPLIT``), the name of the fused one
(``FUSED``) and, by name, which slices an adapter piece covers (``PIECE_SLICES``); its forward asks
:meth:`FusableProjections.project` and never branches on the layout.

Changing a block's layout (with the adapters attached to it) is a model transform:
:mod:`edgelora.lora.fusion`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """``nn.Linear(in_features, sum(output_sizes))`` whose output rows are named slices."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Mapping[str, int],
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        sizes = dict(output_sizes)
        if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes.values()):
            raise ValueError(f"output_sizes must be positive integers by name, got {sizes}")
        super().__init__(in_features, sum(sizes.values()), bias=bias, dtype=dtype, device=device)
        self.output_sizes = sizes

    @classmethod
    def from_linears(cls, parts: Mapping[str, nn.Linear]) -> FusedLinear:
        """Concatenate linears with the same input (all with a bias, or none) into one fused
        layer (a copy)."""
        ins = {name: lin.in_features for name, lin in parts.items()}
        if len(set(ins.values())) != 1:
            raise ValueError(f"cannot fuse linears with different in_features: {ins}")
        biased = {name: lin.bias is not None for name, lin in parts.items()}
        if len(set(biased.values())) != 1:
            raise ValueError(f"cannot fuse linears of which only some have a bias: {biased}")
        first = next(iter(parts.values())).weight
        fused = cls(
            first.shape[1],
            {name: lin.out_features for name, lin in parts.items()},
            bias=next(iter(biased.values())),
            dtype=first.dtype,
            device=first.device,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([lin.weight for lin in parts.values()]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([lin.bias for lin in parts.values()]))
        return fused

    def rows(self, name: str) -> slice:
        """The output rows of slice ``name``."""
        start = 0
        for key, size in self.output_sizes.items():
            if key == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``y`` (this layer's output) cut into its slices, in order."""
        return tuple(torch.split(y, list(self.output_sizes.values()), dim=-1))

    def unfuse(self) -> dict[str, nn.Linear]:
        """One ``nn.Linear`` per slice holding a copy of its rows."""
        out = {}
        for name, size in self.output_sizes.items():
            lin = nn.Linear(
                self.in_features,
                size,
                bias=self.bias is not None,
                dtype=self.weight.dtype,
                device=self.weight.device,
            )
            with torch.no_grad():
                lin.weight.copy_(self.weight[self.rows(name)])
                if self.bias is not None:
                    lin.bias.copy_(self.bias[self.rows(name)])
            out[name] = lin
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, output_sizes={self.output_sizes}"


class FusableProjections(nn.Module):
    """Mixin for a block whose split projections ``SPLIT`` (same input) can run as one fused
    layer named ``FUSED``. ``PIECE_SLICES`` declares, by name, which slices an adapter piece
    covers (e.g. ``wqkv`` -> ``(wq, wk, wv)``): the only way pieces map onto slices.

    ``checkpoint_fused`` records the layout the block's checkpoint had (see
    :func:`edgelora.lora.fusion.restore_checkpoint_fusion_state`).
    """

    SPLIT: tuple[str, ...] = ()
    FUSED: str = ""
    PIECE_SLICES: dict[str, tuple[str, ...]] = {}
    checkpoint_fused: bool = False

    @property
    def fusable(self) -> bool:
        return bool(self.SPLIT)

    @property
    def is_fused(self) -> bool:
        return bool(self.FUSED) and self.FUSED in self._modules

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The split projections of ``x``, in ``SPLIT`` order, whichever the layout."""
        fused = self._modules.get(self.FUSED)
        if fused is not None:
            return fused.split(fused(x))
        return tuple(self._modules[name](x) for name in self.SPLIT)

    @property
    def in_features(self) -> int:
        first = self._modules.get(self.FUSED) or self._modules[self.SPLIT[0]]
        return first.in_features

    def slice_sizes(self) -> dict[str, int]:
        if self.is_fused:
            return dict(self._modules[self.FUSED].output_sizes)
        return {name: self._modules[name].out_features for name in self.SPLIT}

    def label(self) -> str:
        """The block's FQN for messages (set by the model), else its class name."""
        return getattr(self, "fqn", "") or type(self).__name__
