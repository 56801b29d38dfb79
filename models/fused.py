"""Fused projections that stay LoRA-aware.

A :class:`FusedLinear` is one ``nn.Linear`` whose output rows are named slices (``wq``, ``wk``,
``wv`` with their GQA sizes; ``w1``, ``w3``), so one matmul replaces several and the 8da4w filter
quantizes it like any linear. LoRA adapters attached to the pieces are packed onto it by
:class:`PackedLoRALinear`: each piece keeps its own ``lora_A`` and each slice its own ``lora_B``
rows over its piece's rank (the non-zero blocks of a block-structured B, so no zeros are
stored), with the piece's rank and scale ``s``; with ``h_p = s_p * (A_p x)`` for slice ``i``'s
piece ``p``, slice ``i`` of the output is::

    y_i = (W x)_i + B_i h_p

which equals the split model's ``W_i x + s_i B_i A_i x``.

Which slices a piece covers is declared by name (a module's ``PIECE_SLICES``), never guessed from
tensor sizes: with ``output_sizes`` ``{a: 128, b: 128, c: 256}`` a 256-row piece is ``c`` or
``a+b`` only because its name says so. A slice no piece covers contributes nothing; sizes that
do not add up, unknown or doubly covered slices raise :class:`ValueError` naming the module, the
sizes and the slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgelora.models.lora import LinearWrapper, LoRALinear


class FusedLinear(nn.Linear):
    """``nn.Linear(in_features, sum(output_sizes))`` whose output rows are named slices."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Mapping[str, int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        sizes = dict(output_sizes)
        if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes.values()):
            raise ValueError(f"output_sizes must be positive integers by name, got {sizes}")
        super().__init__(in_features, sum(sizes.values()), bias=False, dtype=dtype, device=device)
        self.output_sizes = sizes

    @classmethod
    def from_linears(cls, parts: Mapping[str, nn.Linear]) -> FusedLinear:
        """Concatenate bias-free linears with the same input into one fused layer (a copy)."""
        ins = {name: lin.in_features for name, lin in parts.items()}
        if len(set(ins.values())) != 1:
            raise ValueError(f"cannot fuse linears with different in_features: {ins}")
        if any(lin.bias is not None for lin in parts.values()):
            raise ValueError(f"cannot fuse linears with a bias: {sorted(parts)}")
        first = next(iter(parts.values())).weight
        fused = cls(
            first.shape[1],
            {name: lin.out_features for name, lin in parts.items()},
            dtype=first.dtype,
            device=first.device,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([lin.weight for lin in parts.values()]))
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
                bias=False,
                dtype=self.weight.dtype,
                device=self.weight.device,
            )
            with torch.no_grad():
                lin.weight.copy_(self.weight[self.rows(name)])
            out[name] = lin
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, output_sizes={self.output_sizes}"


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
        # The same expression as LoRALinear's, so packing and unpacking keep the exact float.
        return (
            self.multiplier * self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        )

    @classmethod
    def from_lora_linear(cls, name: str, module: LoRALinear) -> LoRAPiece:
        return cls(
            (name,),
            module.lora_a.weight.detach(),
            module.lora_b.weight.detach(),
            module.alpha,
            module.use_rslora,
            module.multiplier,
        )

    def to_lora_linear(self, linear: nn.Linear) -> LoRALinear:
        wrapped = LoRALinear(
            linear,
            rank=self.rank,
            alpha=self.alpha,
            use_rslora=self.use_rslora,
            multiplier=self.multiplier,
        )
        with torch.no_grad():
            wrapped.lora_a.weight.copy_(self.lora_a)
            wrapped.lora_b.weight.copy_(self.lora_b)
        return wrapped


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


class PackedLoRALinear(LinearWrapper):
    """A :class:`FusedLinear` with LoRA pieces packed onto it: each piece's A, each slice's B.

    ``lora_a[i]`` is piece ``i``'s A (``[rank_i, in]``); ``lora_b[slice]`` is the B rows of that
    slice over its piece's rank -- the non-zero blocks of the block-structured B, so the program
    carries the adapter's own bytes. ``lora_a``/``lora_b`` are adapter constants
    (excluded from quantization and from the foundation by FQN component); ``linear`` is the
    shared fused base layer.

    When every slice has a piece, the delta is one ``cat`` of the slices' B outputs added to the
    fused output: no slicing of activations, which XNNPACK cannot delegate under a dynamic
    sequence length (each such slice would split the delegate partition and run as a portable
    op). Otherwise the fused output is split and the covered slices get their delta.
    """

    def __init__(
        self, linear: FusedLinear, pieces: Sequence[LoRAPiece], *, module: str = ""
    ) -> None:
        super().__init__()
        check_pieces(module or "fused layer", linear.output_sizes, linear.in_features, pieces)
        self.linear = linear
        self.layout = [(p.slices, p.rank, p.alpha, p.use_rslora, p.multiplier) for p in pieces]
        dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = [a(x) * s for a, s in zip(self.lora_a, self._scales, strict=True)]
        names = list(self.linear.output_sizes)
        if self._covers_all:
            delta = [self.lora_b[s](h[self._piece[s]]) for s in names]
            return self.linear(x) + (delta[0] if len(delta) == 1 else torch.cat(delta, dim=-1))
        parts = []
        for s, part in zip(names, self.linear.split(self.linear(x)), strict=True):
            if s in self._piece:
                part = part + self.lora_b[s](h[self._piece[s]])
            parts.append(part)
        return torch.cat(parts, dim=-1)

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


def split_piece(piece: LoRAPiece, output_sizes: Mapping[str, int]) -> dict[str, LoRAPiece]:
    """Per-slice pieces of a piece spanning several slices: the same A, each slice's B rows.

    Exact: ``B[rows_i] @ (A x)`` is slice ``i`` of ``B @ (A x)``.
    """
    out, row = {}, 0
    for s in piece.slices:
        size = output_sizes[s]
        out[s] = LoRAPiece(
            (s,),
            piece.lora_a,
            piece.lora_b[row : row + size],
            piece.alpha,
            piece.use_rslora,
            piece.multiplier,
        )
        row += size
    return out


def fuse_modules(parts: Mapping[str, nn.Module], *, module: str = "") -> nn.Module:
    """Fuse split projections (plain ``nn.Linear`` or :class:`LoRALinear`) into one layer.

    Adapters on the pieces are packed onto the fused layer (a :class:`PackedLoRALinear`).
    """
    bases = {n: m.linear if isinstance(m, LoRALinear) else m for n, m in parts.items()}
    for name, base in bases.items():
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{module}.{name}: cannot fuse a {type(base).__name__}")
    fused = FusedLinear.from_linears(bases)
    pieces = [
        LoRAPiece.from_lora_linear(n, m) for n, m in parts.items() if isinstance(m, LoRALinear)
    ]
    return PackedLoRALinear(fused, pieces, module=module) if pieces else fused


def unfuse_module(fused: nn.Module) -> dict[str, nn.Module]:
    """Split a fused layer back into per-slice layers; packed adapters become per-slice
    :class:`LoRALinear` wrappers (a piece spanning several slices is split by rows, exactly)."""
    base = fused.linear if isinstance(fused, PackedLoRALinear) else fused
    parts: dict[str, nn.Module] = dict(base.unfuse())
    if isinstance(fused, PackedLoRALinear):
        for piece in fused.pieces():
            for name, part in split_piece(piece, base.output_sizes).items():
                parts[name] = part.to_lora_linear(parts[name])
    return parts


class FusableProjections(nn.Module):
    """Mixin for a block whose split projections ``SPLIT`` (same input) can run as one fused
    layer named ``FUSED``. ``PIECE_SLICES`` declares, by name, which slices an adapter piece
    covers (e.g. ``wqkv`` -> ``(wq, wk, wv)``): the only way pieces map onto slices.

    ``checkpoint_fused`` records the layout the block's checkpoint had (see
    ``Transformer.restore_checkpoint_fusion_state``).
    """

    SPLIT: tuple[str, ...] = ()
    FUSED: str = ""
    PIECE_SLICES: dict[str, tuple[str, ...]] = {}
    checkpoint_fused: bool = False

    @property
    def is_fused(self) -> bool:
        return self.FUSED in self._modules

    def fuse_projections(self, inplace: bool = False) -> None:
        """Run the split projections as one fused layer (adapters on them are packed onto it).

        ``inplace=True`` deletes the split layers (their memory is freed); ``inplace=False``
        keeps them, so :meth:`unfuse_projections` restores them untouched (same storage).
        Idempotent.
        """
        if not self.is_fused:
            parts = {name: self._modules[name] for name in self.SPLIT}
            self.add_module(self.FUSED, fuse_modules(parts, module=self._label()))
        if inplace:
            for name in self.SPLIT:
                self._modules.pop(name, None)

    def unfuse_projections(self) -> None:
        """Back to split layers: the kept ones if ``fuse_projections(inplace=False)`` kept them,
        else new ones holding the fused rows, with packed adapters split back. Idempotent."""
        if not self.is_fused:
            return
        fused = self._modules.pop(self.FUSED)
        if all(name in self._modules for name in self.SPLIT):
            kept_plain = not any(isinstance(self._modules[n], LoRALinear) for n in self.SPLIT)
            if isinstance(fused, PackedLoRALinear) and kept_plain:
                # Adapters attached after fusing: split them back onto the kept layers.
                for piece in fused.pieces():
                    for name, part in split_piece(piece, fused.output_sizes).items():
                        self._modules[name] = part.to_lora_linear(self._modules[name])
            return
        for name, module in unfuse_module(fused).items():
            self.add_module(name, module)

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

    def _label(self) -> str:
        return getattr(self, "fqn", "") or type(self).__name__
