"""The LoRA wrapper modules, with one interface.

A wrapper keeps the base projection as a plain submodule named ``linear`` (an ``nn.Linear`` or
a :class:`~edgelora.models.fused.FusedLinear`), so quantizers see and rewrite it like any other
linear, while the adapter's ``lora_a``/``lora_b`` are separate ``nn.Linear`` modules that stay
float. Every wrapper answers the same questions (:class:`LoRAWrapper`):

- ``from_base(base, ...)``: wrap a base layer (not a copy: a quantized base stays shared);
- ``delta(dtype)``: ``(a [rank, in], b [out, rank])`` with every scale folded into ``b``, so the
  wrapper adds ``x @ a.T @ b.T`` -- what merging folds into the base and what a switchable slot
  is fed;
- ``factors()``: each ``lora_A`` layer with the ``lora_B`` layers that read its output;
- ``unwrap()``: the base layer back.

:class:`PackedLoRALinear` packs adapters on the *pieces* of a fused layer (``wq``/``wk``/``wv``
of ``wqkv``): each piece keeps its own ``lora_A`` and each slice its own ``lora_B`` rows over its
piece's rank (the non-zero blocks of a block-structured B, so no zeros are stored). With
``h_p = s_p * (A_p x)`` for slice ``i``'s piece ``p``, slice ``i`` of the output is
``y_i = (W x)_i + B_i h_p``, which equals the split model's ``W_i x + s_i B_i A_i x``. Which
slices a piece covers is declared by name (a block's ``PIECE_SLICES``), never guessed from
tensor sizes; sizes that do not add up, unknown or doubly covered slices raise
:class:`ValueError` naming the module, the sizes and the slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgelora.lora.record import LoRAWeights, lora_scale
from edgelora.models.fused import FusedLinear


class LinearWrapper(nn.Module):
    """A module around a base layer named ``linear`` that answers for it: ``in_features``,
    ``out_features``, ``weight`` and ``bias`` are the wrapped layer's, and around a fused layer
    so are ``output_sizes``, ``rows`` and ``split``."""

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

    def rows(self, name: str) -> slice:
        return self.linear.rows(name)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear.split(y)

    def unwrap(self) -> nn.Module:
        """The wrapped base layer."""
        return self.linear


class LoRAWrapper(LinearWrapper):
    """The interface of an adapter wrapper (see the module docstring)."""

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def delta(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def factors(self) -> list[tuple[nn.Linear, list[nn.Linear]]]:
        """Each ``lora_A`` layer with the ``lora_B`` layers that read its output, in order."""
        return [(self.lora_a, [self.lora_b])]

    def fold_scale(self) -> None:
        """Multiply each ``lora_B`` weight by its scale, in place, and drop the scaling from
        the forward: one elementwise op less per projection in a program (XNNPACK's per-op
        cost is a large part of a small adapter's). For the attached copy a program is made
        from: ``alpha`` and ``multiplier`` then no longer describe ``lora_B``."""
        raise NotImplementedError


def _into(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``layer``'s weight dtype: an adapter stored in fp16 (``--adapter-dtype fp16``)
    under an fp32 model computes in fp16 between two conversions. A quantized (int8) adapter
    layer reports its float dtype and takes ``x`` as it is."""
    dtype = layer.weight.dtype
    return x if dtype == x.dtype or not dtype.is_floating_point else x.to(dtype)


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An adapter's output ``y`` back in the dtype of the layer's input ``x``."""
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _float_dtype(weight: torch.Tensor) -> torch.dtype:
    # A quantized base (torchao tensor subclass) reports an integer dtype: adapters stay fp32.
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class LoRALinear(LoRAWrapper):
    """``y = linear(x) + scale * lora_b(lora_a(x))`` with ``scale = alpha / rank``.

    Args:
        linear: the base projection (``in_features -> out_features``); wrapped, not copied.
        rank: LoRA rank ``r`` (> 0).
        alpha: LoRA alpha.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead (rank-stabilised LoRA).
        multiplier: a user factor on the whole contribution (``--lora NAME=DIR:scale=S``).

    A fresh wrapper is the identity (PEFT's init: A random, B zero). Loading a state dict in the
    pre-wrapping layout (``<prefix>.weight``) remaps the keys onto ``<prefix>.linear.weight``.
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
        self._rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.multiplier = float(multiplier)
        self.scale = lora_scale(self.alpha, rank, self.use_rslora, self.multiplier)
        dtype = _float_dtype(linear.weight)
        self.lora_a = nn.Linear(linear.in_features, rank, bias=False, dtype=dtype)
        self.lora_b = nn.Linear(rank, linear.out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def from_base(
        cls, linear: nn.Linear, weights: LoRAWeights, *, multiplier: float = 1.0
    ) -> LoRALinear:
        """``linear`` wrapped with ``weights`` (copied into the adapter's own parameters)."""
        wrapped = cls(
            linear,
            rank=weights.rank,
            alpha=weights.alpha,
            use_rslora=weights.use_rslora,
            multiplier=multiplier,
        )
        with torch.no_grad():
            wrapped.lora_a.weight.copy_(weights.lora_a)
            wrapped.lora_b.weight.copy_(weights.lora_b)
        return wrapped

    @property
    def rank(self) -> int:
        return self._rank

    def weights(self) -> LoRAWeights:
        """The adapter's weights as a record (detached, no copy)."""
        return LoRAWeights(
            self.lora_a.weight.detach(), self.lora_b.weight.detach(), self.alpha, self.use_rslora
        )

    def delta(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lora_a.weight.detach().to(dtype)
        return a, self.lora_b.weight.detach().to(dtype) * self.scale

    def fold_scale(self) -> None:
        with torch.no_grad():
            self.lora_b.weight.mul_(self.scale)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # first: the graph's order sets the order of foundation.ptd's keys
        delta = _like(self.lora_b(self.lora_a(_into(self.lora_a, x))), x)
        return y + (delta if self.scale == 1.0 else self.scale * delta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before wrapping store the base weight as `<prefix>.weight`.
        for attr in ("weight", "bias"):
            old_key, new_key = prefix + attr, prefix + "linear." + attr
            if old_key in state_dict and new_key not in state_dict:
                state_dict[new_key] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


@dataclass
class LoRAPiece:
    """One LoRA adapter piece on a fused layer: its ``lora_b`` spans the rows of ``slices``."""

    slices: tuple[str, ...]
    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [sum of the slices' sizes, rank]
    alpha: float
    use_rslora: bool = False
    multiplier: float = 1.0

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora, self.multiplier)

    @classmethod
    def of(cls, slices: tuple[str, ...], w: LoRAWeights, multiplier: float = 1.0) -> LoRAPiece:
        return cls(tuple(slices), w.lora_a, w.lora_b, w.alpha, w.use_rslora, multiplier)

    @classmethod
    def from_lora_linear(cls, name: str, module: LoRALinear) -> LoRAPiece:
        return cls.of((name,), module.weights(), module.multiplier)

    def to_lora_linear(self, linear: nn.Linear) -> LoRALinear:
        w = LoRAWeights(self.lora_a, self.lora_b, self.alpha, self.use_rslora)
        return LoRALinear.from_base(linear, w, multiplier=self.multiplier)

    def split(self, output_sizes: Mapping[str, int]) -> dict[str, LoRAPiece]:
        """Per-slice pieces: the same A, each slice's B rows (exact: ``B[rows_i] @ (A x)`` is
        slice ``i`` of ``B @ (A x)``)."""
        out, row = {}, 0
        for s in self.slices:
            size = output_sizes[s]
            out[s] = LoRAPiece(
                (s,),
                self.lora_a,
                self.lora_b[row : row + size],
                self.alpha,
                self.use_rslora,
                self.multiplier,
            )
            row += size
        return out


def check_pieces(
    module: str, output_sizes: Mapping[str, int], in_features: int, pieces: Sequence[LoRAPiece]
) -> None:
    """Raise ValueError (naming ``module``, sizes and slices) unless ``pieces`` fit the layout."""
    covered: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        unknown = [s for s in piece.slices if s not in output_sizes]
        if not piece.slices or unknown:
            raise ValueError(
                f"{module}: LoRA piece {i} covers slices {list(piece.slices)}; unknown "
                f"{unknown} (the layer's slices are {dict(output_sizes)})"
            )
        for s in piece.slices:
            if s in covered:
                raise ValueError(
                    f"{module}: slice {s!r} is covered by LoRA pieces {covered[s]} and {i} "
                    f"(slices {[list(p.slices) for p in pieces]}); each slice takes one piece"
                )
            covered[s] = i
        rows = sum(output_sizes[s] for s in piece.slices)
        if piece.lora_a.dim() != 2 or piece.lora_b.dim() != 2:
            raise ValueError(f"{module}: LoRA piece {i} needs 2-D lora_A and lora_B")
        if (
            piece.lora_a.shape[1] != in_features
            or piece.lora_b.shape[0] != rows
            or piece.lora_b.shape[1] != piece.rank
        ):
            raise ValueError(
                f"{module}: LoRA piece {i} for slices {list(piece.slices)} (sizes "
                f"{[output_sizes[s] for s in piece.slices]}, sum {rows}, in_features "
                f"{in_features}) has lora_A {list(piece.lora_a.shape)} and lora_B "
                f"{list(piece.lora_b.shape)}; expected [r, {in_features}] and [{rows}, r]"
            )


class PackedLoRALinear(LoRAWrapper):
    """A :class:`FusedLinear` with LoRA pieces packed onto it: each piece's A, each slice's B.

    ``lora_a[i]`` is piece ``i``'s A (``[rank_i, in]``); ``lora_b[slice]`` is the B rows of that
    slice over its piece's rank. When every slice has a piece, the delta is one ``cat`` of the
    slices' B outputs added to the fused output: no slicing of activations, which XNNPACK
    cannot delegate under a dynamic sequence length (each such slice would split the delegate
    partition and run as a portable op). Otherwise the fused output is split and the covered
    slices get their delta.
    """

    def __init__(
        self, linear: FusedLinear, pieces: Sequence[LoRAPiece], *, module: str = ""
    ) -> None:
        super().__init__()
        check_pieces(module or "fused layer", linear.output_sizes, linear.in_features, pieces)
        self.linear = linear
        self.layout = [(p.slices, p.rank, p.alpha, p.use_rslora, p.multiplier) for p in pieces]
        dtype = _float_dtype(linear.weight)
        self.lora_a = nn.ModuleList()
        self.lora_b = nn.ModuleDict()
        self._piece: dict[str, int] = {}  # slice -> index of its piece
        self._scales = [p.scale for p in pieces]
        with torch.no_grad():
            for i, p in enumerate(pieces):
                a = nn.Linear(linear.in_features, p.rank, bias=False, dtype=dtype)
                a.weight.copy_(p.lora_a)
                self.lora_a.append(a)
                row = 0
                for s in p.slices:
                    size = linear.output_sizes[s]
                    b = nn.Linear(p.rank, size, bias=False, dtype=dtype)
                    b.weight.copy_(p.lora_b[row : row + size])
                    self.lora_b[s] = b
                    self._piece[s] = i
                    row += size
        self._covers_all = all(s in self._piece for s in linear.output_sizes)

    @classmethod
    def from_base(
        cls, linear: FusedLinear, pieces: Sequence[LoRAPiece], *, module: str = ""
    ) -> PackedLoRALinear:
        """``linear`` with ``pieces`` packed onto it (their tensors copied)."""
        return cls(linear, pieces, module=module)

    @property
    def rank(self) -> int:
        """The total rank of the packed pieces (rows of :meth:`stacked_a`)."""
        return sum(a.out_features for a in self.lora_a)

    def stacked_a(self) -> torch.Tensor:
        """Every piece's A stacked along the rank: ``[total rank, in]``."""
        return torch.cat([a.weight for a in self.lora_a])

    def stacked_scale(self) -> torch.Tensor:
        """Each stacked rank column's scale (its piece's): ``[total rank]``."""
        return torch.cat(
            [
                a.weight.new_full((a.out_features,), s)
                for a, s in zip(self.lora_a, self._scales, strict=True)
            ]
        )

    def packed_b(self) -> torch.Tensor:
        """The block-structured B ``[out, total rank]`` (zero outside each slice's block), so
        the layer's delta is ``packed_b() @ (stacked_scale() * (stacked_a() x))``."""
        b = self.lora_a[0].weight.new_zeros(self.linear.out_features, self.rank)
        col = 0
        for slices, rank, *_ in self.layout:
            for s in slices:
                b[self.linear.rows(s), col : col + rank] = self.lora_b[s].weight.detach()
            col += rank
        return b

    def delta(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.stacked_a().detach().to(dtype)
        return a, self.packed_b().to(dtype) * self.stacked_scale().to(dtype)[None, :]

    def fold_scale(self) -> None:
        with torch.no_grad():
            for (slices, *_), s in zip(self.layout, self._scales, strict=True):
                for name in slices:
                    self.lora_b[name].weight.mul_(s)
        self._scales = [1.0] * len(self._scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = _into(self.lora_a[0], x)
        h = [
            a(xa) if s == 1.0 else a(xa) * s for a, s in zip(self.lora_a, self._scales, strict=True)
        ]
        names = list(self.linear.output_sizes)
        if self._covers_all:
            delta = [self.lora_b[s](h[self._piece[s]]) for s in names]
            delta = _like(delta[0] if len(delta) == 1 else torch.cat(delta, dim=-1), x)
            return self.linear(x) + delta
        parts = []
        for s, part in zip(names, self.linear.split(self.linear(x)), strict=True):
            if s in self._piece:
                part = part + _like(self.lora_b[s](h[self._piece[s]]), x)
            parts.append(part)
        return torch.cat(parts, dim=-1)

    def factors(self) -> list[tuple[nn.Linear, list[nn.Linear]]]:
        return [
            (a, [self.lora_b[s] for s in slices])
            for a, (slices, *_) in zip(self.lora_a, self.layout, strict=True)
        ]

    def pieces(self) -> list[LoRAPiece]:
        """The packed pieces, bit for bit as they were given."""
        out = []
        for (slices, _, alpha, use_rslora, multiplier), a in zip(
            self.layout, self.lora_a, strict=True
        ):
            b = torch.cat([self.lora_b[s].weight for s in slices])
            out.append(
                LoRAPiece(
                    slices,
                    a.weight.detach().clone(),
                    b.detach().clone(),
                    alpha,
                    use_rslora,
                    multiplier,
                )
            )
        return out

    def extra_repr(self) -> str:
        return "pieces=" + ", ".join(f"{'+'.join(s)}:r{r}" for s, r, *_ in self.layout)
