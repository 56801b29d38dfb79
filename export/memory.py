"""The up-front memory estimate of an export, checked before any long step.

The foundation is built one part at a time (:mod:`edgelora.export.foundation`), so the peak is
what the export keeps plus the larger of two transients, each counted from the model's shapes
(on the meta device, nothing allocated):

* **resident**: the quantized model (torchao keeps a 4- or 8-bit weight as one int8 per value,
  an fp32 scale and an int8 zero point per group), the float weights kept (the embedding unless
  quantized, in the checkpoint's dtype when that is narrower, norms, LoRA matrices), the KV caches and the rotary tables and masks;
* **building**: one part's fp32 working copy (the largest: often the output layer) plus its
  checkpoint pages and a block of torchao's temporaries (weights are quantized a block of rows
  at a time, :mod:`edgelora.quant.rows`);
* **lowering**: XNNPACK's packed weights (half a byte per 4-bit value, a scale per group), the
  float constants the emitter copies for ``foundation.ptd``, and the packing temporaries of
  the largest partition (the output layer's: ~3x its packed size at 1B), bounded here by the
  packed weights a second time. (ExecuTorch's deep copy of every partition's weights before
  compiling any is avoided, ``backends/xnnpack/lower.py``.)

and a fixed overhead (PyTorch, ExecuTorch and torchao loaded, the tracing machinery), then a
margin. Measured on Llama-3.2-1B and -3B shapes (``bench/scale.py``); tested to stay an upper
bound of measured peaks (``tests/export/test_memory_estimate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgelora._memory import available_memory
from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs
from edgelora.models.llama import Transformer
from edgelora.quant.rows import BLOCK_VALUES

# Libraries loaded + tracing: ~0.45 GiB for a tiny model; at 1B the process holds ~1.1 GiB
# beyond the model's own tensors after the first program, ~1.5 GiB after the second
# (export and lowering bookkeeping grows with the model; measured in bench/scale.py).
FIXED_OVERHEAD = 0.5 * 2**30
OVERHEAD_PER_RESIDENT = 0.5
MARGIN = 1.10  # on top of the sum: allocator fragmentation, sampling error
# torchao's temporaries while one block of rows (at most BLOCK_VALUES, quant/rows.py) is
# quantized, in fp32 copies of the block: measured 3.5 (affine) and 4.6 (HQQ scale-only) on a
# 32000 x 512 weight, counted as 6.
_BLOCK_TEMPORARIES = 6


@dataclass(frozen=True)
class MemoryEstimate:
    resident: int
    building: int
    lowering: int
    peak: int

    def summary(self) -> str:
        gib = 2**30
        return (
            f"{self.peak / gib:.2f} GiB (model {self.resident / gib:.2f}, + building "
            f"{self.building / gib:.2f} or lowering {self.lowering / gib:.2f}, + overhead, "
            f"x{MARGIN:g})"
        )


def _quantized_bytes(values: int, rows: int, cols: int, group: int) -> int:
    groups = rows * (cols // group if group else 1)
    return values + groups * 5  # int8 per value; fp32 scale + int8 zero point per group


def estimate_export_memory(
    args: ModelArgs,
    *,
    qmode: str = "8da4w",
    group_size: int = 32,
    embedding_bits: int = 0,
    embedding_group_size: int = 0,
    dtype_bytes: int = 4,
    checkpoint_dtype_bytes: int = 2,
    calibrated: bool = False,
) -> MemoryEstimate:
    """The estimated peak resident memory of exporting a model of ``args`` (see the module
    docstring); ``dtype_bytes`` is the export's float size, ``checkpoint_dtype_bytes`` the
    checkpoint's (its pages of one part are read while that part is built). ``calibrated``:
    the recipe calibrates, which holds the whole model in float while it measures (plus the
    recorded layer inputs, one layer's input moments and the GPTQ int8 weights)."""
    with torch.device("meta"):
        model = Transformer(args)
    resident = building = packed = float_constants = 0
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        if not direct:
            continue
        values = sum(p.numel() for p in direct)
        if isinstance(module, nn.Linear) and qmode != "none":
            rows, cols = module.weight.shape
            resident += _quantized_bytes(rows * cols, rows, cols, group_size)
            bits = 4 if qmode == "8da4w" else 8
            groups = rows * (cols // group_size if group_size else 1)
            packed += rows * cols * bits // 8 + groups * 4
            resident += (values - rows * cols) * dtype_bytes  # a bias stays float
            float_constants += (values - rows * cols) * dtype_bytes
        elif isinstance(module, nn.Embedding) and embedding_bits:
            rows, cols = module.weight.shape
            resident += _quantized_bytes(values, rows, cols, embedding_group_size)
            groups = rows * (cols // embedding_group_size if embedding_group_size else 1)
            float_constants += values * embedding_bits // 8 + groups * 4
        else:
            size = dtype_bytes
            if isinstance(module, nn.Embedding) and dtype_bytes == 4:
                size = min(dtype_bytes, checkpoint_dtype_bytes)  # kept narrow (foundation.py)
            resident += values * size
            float_constants += values * size
    for part in [*model.layers, *(c for n, c in model.named_children() if n != "layers")]:
        values = sum(p.numel() for p in part.parameters())
        biggest = max((p.numel() for p in part.parameters()), default=0)
        work = values * (4 + checkpoint_dtype_bytes)
        work += min(biggest, BLOCK_VALUES) * 4 * _BLOCK_TEMPORARIES
        building = max(building, work)
    if calibrated:
        from edgelora.quant.calibrate import MAX_TOKENS

        params = sum(p.numel() for p in model.parameters())
        hidden = args.n_layers * MAX_TOKENS * args.dim * 4
        widest = max(args.dim, args.ffn_hidden_dim, args.n_heads * args.head_dim)
        moments = 3 * widest * widest * 8  # float64 sums of one layer's distinct inputs
        building = max(building, params * (dtype_bytes + 1) + hidden + moments)
    resident += sum(b.numel() * b.element_size() for b in model.buffers())
    lowering = 2 * packed + float_constants
    overhead = FIXED_OVERHEAD + OVERHEAD_PER_RESIDENT * resident
    peak = int((overhead + resident + max(building, lowering)) * MARGIN)
    return MemoryEstimate(resident, building, lowering, peak)


def check_memory(args: ModelArgs, available: int | None = None, **settings) -> MemoryEstimate:
    """Fail early (:class:`ConfigError` with the estimate) if the export cannot fit in memory,
    rather than being killed half-way; returns the estimate (``settings``: the quantization
    and dtypes, as :func:`estimate_export_memory` takes them)."""
    estimate = estimate_export_memory(args, **settings)
    available = available_memory() if available is None else available
    if available is not None and estimate.peak > available:
        hint = ""
        if settings.get("calibrated"):
            plain = estimate_export_memory(args, **{**settings, "calibrated": False})
            if plain.peak <= available:
                hint = (
                    "; the recipe calibrates, which holds the model in fp32 while it measures: "
                    f"a recipe without calibration (--recipe q4_0 or q8_0) needs about "
                    f"{plain.peak / 2**30:.1f} GiB"
                )
        raise ConfigError(
            f"this model needs about {estimate.summary()} to export; only "
            f"{available / 2**30:.1f} GiB is available{hint}"
        )
    return estimate
