"""GPTQ: int4 grouped weights rounded with error compensation from calibration activations.

Rounding each weight to its nearest 4-bit level ignores what the layer is for: its output
``W x`` on real inputs. GPTQ (Frantar et al., 2022) quantizes the columns of ``W`` one at a
time and moves each column's rounding error onto the columns not yet quantized, weighted by the
inverse of ``H = E[x x^T]`` (the inputs' second moments), so the error that reaches the output
is what the remaining columns cannot absorb.

Written here rather than taken from torchao: torchao 0.18's GPTQ (``torchao.prototype``) makes
its own int4 tensor layouts (``Int4WeightOnly``/tinygemm), not the ``IntxUnpackedToInt8Tensor``
with int8 dynamic activations that XNNPACK lowers. The result here is plain ``(qdata, scale)``
that :func:`edgelora.quant.linear.quantize_linear` wraps in that tensor.

Scales are symmetric (``[-8, 7]``, zero point 0, as XNNPACK's QB4W kernels take), one per group
of ``group_size`` input columns, chosen when the group is reached from the error-compensated
weights with a small clipping search, and rounded to bf16 first -- XNNPACK stores group scales
in bf16, so the program's weights are exactly these.
"""

from __future__ import annotations

import torch

QMIN, QMAX = -8, 7
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate fractions of a group's max |w|
_BLOCK = 128  # columns per lazy-update block


def group_scales(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """bf16-exact scales ``[rows]`` for one group of columns ``w [rows, g]``: the clip of
    ``max |w|`` among :data:`_CLIPS` with the least ``importance``-weighted rounding error."""
    top = w.abs().amax(1).clamp(min=1e-12)
    best, best_err = None, None
    for clip in _CLIPS:
        s = (top * clip / ((QMAX - QMIN) / 2)).to(torch.bfloat16).float().clamp(min=1e-12)
        q = (w / s[:, None]).round().clamp(QMIN, QMAX) * s[:, None]
        err = ((q - w) ** 2 * importance[None, :]).sum(1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qdata int8 [out, in] in [-8, 7], scale float32 [out, in / group_size])`` of ``weight``
    (``[out, in]``) for inputs with second moments ``hessian`` (``[in, in]``, symmetric PSD).

    ``damp`` adds that fraction of the mean diagonal to the diagonal (numerical stability, as
    the paper). Deterministic: the same tensors give the same bytes."""
    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {group_size}")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype) * damp * torch.diag(h).mean()
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads to later ones
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    importance = torch.diag(h).float()
    qdata = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // group_size, dtype=torch.float32)
    block = max(_BLOCK // group_size, 1) * group_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = slice(i, i + group_size)
                s = group_scales(w1[:, g].float(), importance[col : col + group_size]).double()
                scales[:, col // group_size] = s.float()
            q = (w1[:, i] / s).round().clamp(QMIN, QMAX)
            qdata[:, col] = q.to(torch.int8)
            e = (w1[:, i] - q * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return qdata, scales
