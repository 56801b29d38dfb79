"""The up-front memory estimate of an export, checked before any long step."""

from __future__ import annotations

import torch

from edgelora._memory import available_memory
from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs
from edgelora.models.llama import Transformer

# Peak export memory per byte of fp32 model state, measured here: the fp32 weights, their
# quantized copies, and torch.export/lowering's working set (stories15M: ~0.95 GB peak for
# 0.10 GB of fp32 state incl. the embedding; 1.3 GB for stories110M's 0.45 GB).
EXPORT_MEMORY_FACTOR = 3.0
_FIXED_OVERHEAD = 600 * 2**20  # torch + executorch + torchao imported, tracing machinery


def estimate_export_memory(args: ModelArgs) -> tuple[int, int]:
    """``(state_bytes, estimated_peak_bytes)``: the model's fp32 parameters and buffers
    (counted on the meta device, nothing allocated) and the export's estimated peak RSS."""
    with torch.device("meta"):
        model = Transformer(args)
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return state, int(state * EXPORT_MEMORY_FACTOR + _FIXED_OVERHEAD)


def check_memory(args: ModelArgs, available: int | None = None) -> int:
    """Fail early (:class:`ConfigError` with the estimate) if the export cannot fit in memory,
    rather than being killed half-way; returns the estimated peak in bytes."""
    state, peak = estimate_export_memory(args)
    available = available_memory() if available is None else available
    if available is not None and peak > available:
        raise ConfigError(
            f"this model needs about {peak / 2**30:.1f} GiB to export ({state / 4 / 1e6:,.0f}M "
            f"fp32 values = {state / 2**30:.2f} GiB of weights and buffers, x"
            f"{EXPORT_MEMORY_FACTOR:g} while quantizing and lowering); only "
            f"{available / 2**30:.1f} GiB is available"
        )
    return peak
