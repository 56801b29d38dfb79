"""Quantize one large weight a block of rows at a time, bit-identical to quantizing it whole.

torchao quantizes a weight as a whole: its fp32 temporaries (``w / scale``, the rounding, the
clamp, the dequantized copy we measure the error with) are each the size of the weight, ~5x
its fp32 bytes at the peak -- 5 GB for Llama-3.2-1B's 128256 x 2048 output layer. Both
quantizers used here (8da4w/8da8w linears, 4/8-bit embeddings) work on groups within a row, so
rows are independent: quantizing ``rows`` at a time into small modules of the same kind and
concatenating their ``qdata``/``scale``/``zero_point`` gives the same tensor, with temporaries
of one block's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Values per block (16 Mi: 64 MiB of fp32); a weight of at most this many is quantized whole.
BLOCK_VALUES = 1 << 24


def quantize_rows(
    module: nn.Linear | nn.Embedding,
    quantize: Callable[[nn.Module], None],
    *,
    block_values: int | None = None,
) -> tuple[float, float]:
    """Quantize ``module.weight`` in place with ``quantize`` (torchao's ``quantize_`` with a
    config, applied to a module) a block of rows at a time; returns the max absolute error of
    the dequantized weight and the max ``|W|`` (for a relative error)."""
    block_values = BLOCK_VALUES if block_values is None else block_values
    weight = module.weight.detach()
    rows = max(1, block_values // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        original = weight.clone()
        quantize(module)
        return _err(module.weight, original), original.abs().max().item()
    pieces, err, top = [], 0.0, 0.0
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        piece = _like(module, block)
        quantize(piece)
        err = max(err, _err(piece.weight, block))
        top = max(top, block.abs().max().item())
        pieces.append(piece.weight.detach())
    module.weight = nn.Parameter(_cat(pieces), requires_grad=False)
    return err, top


def _like(module: nn.Module, block: torch.Tensor) -> nn.Module:
    """A module of ``module``'s kind holding ``block`` as its weight (no bias: it is not part
    of the quantized tensor)."""
    if isinstance(module, nn.Embedding):
        piece = nn.Embedding(block.shape[0], block.shape[1], device="meta")
    else:
        piece = nn.Linear(block.shape[1], block.shape[0], bias=False, device="meta")
    piece.weight = nn.Parameter(block.clone(), requires_grad=False)
    return piece


def _err(q: torch.Tensor, original: torch.Tensor) -> float:
    return (q.dequantize() - original).abs().max().item()


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """One torchao quantized tensor from row blocks of the same kind."""
    first = pieces[0]
    names, attrs = first.__tensor_flatten__()
    for p in pieces[1:]:
        if p.__tensor_flatten__()[1] != attrs:
            raise RuntimeError("internal error: row blocks quantized differently")
    data = {n: torch.cat([getattr(p, n) for p in pieces]) for n in names}
    return type(first).__tensor_unflatten__(data, attrs, None, None)
