"""Weight-only quantization of the token embedding (torchao ``IntxWeightOnlyConfig``).

ExecuTorch fuses torchao's ``dequantize_affine`` + ``embedding`` into its quantized
``embedding_4bit``/``embedding_byte`` kernels when the program is emitted, so only the looked-up
rows are dequantized at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgelora.errors import ConfigError
from edgelora.quant.rows import quantize_rows

EMBEDDING_BITS = (0, 4, 8)


@dataclass(frozen=True)
class EmbeddingReport:
    fqn: str
    bits: int
    group_size: int
    max_abs_err: float

    def summary_line(self) -> str:
        if not self.bits:
            return f"embedding {self.fqn}: kept float"
        return (
            f"embedding {self.fqn}: int{self.bits} g{self.group_size}, "
            f"max abs err {self.max_abs_err:.3g}"
        )


def quantize_embedding(
    model: nn.Module, bits: int, group_size: int, fqn: str = "tok_embeddings"
) -> EmbeddingReport:
    """Quantize ``model.<fqn>`` (an ``nn.Embedding``) in place to ``bits`` (0 = leave float).

    ``group_size`` groups along the embedding dim (0 = one scale per row); it must divide it.
    """
    if bits not in EMBEDDING_BITS:
        raise ConfigError(f"embedding bits must be one of {EMBEDDING_BITS}, got {bits!r}")
    if not bits:
        return EmbeddingReport(fqn, 0, group_size, 0.0)
    emb = model.get_submodule(fqn)
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"{fqn} is not an nn.Embedding")
    dim = emb.embedding_dim
    if group_size < 0 or (group_size and dim % group_size):
        raise ConfigError(
            f"embedding group size {group_size} must be 0 or divide the embedding dim {dim}"
        )
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    config = IntxWeightOnlyConfig(
        weight_dtype=torch.int4 if bits == 4 else torch.int8,
        granularity=PerAxis(0) if group_size == 0 else PerGroup(group_size),
    )
    with torch.no_grad():  # a block of rows at a time (quant/rows.py)
        err, _ = quantize_rows(
            emb, lambda m: quantize_(m, config, filter_fn=lambda mod, name: mod is m)
        )
    return EmbeddingReport(fqn, bits, group_size, err)
