"""The quantized base model every program of an export shares."""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgelora.export.config import FoundationSpec
from edgelora.lora.attach import merge_adapter
from edgelora.lora.fusion import set_fusion
from edgelora.lora.record import Adapter
from edgelora.models.args import ModelArgs
from edgelora.models.llama import Transformer, build_model
from edgelora.quant.embedding import EmbeddingReport, quantize_embedding
from edgelora.quant.linear import QuantReport, quantize_linears
from edgelora.weights.checkpoint import Checkpoint, load_checkpoint


def build_foundation(
    args: ModelArgs,
    spec: FoundationSpec,
    *,
    checkpoint: Checkpoint | None = None,
    merge: Adapter | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Transformer, QuantReport, EmbeddingReport]:
    """Build the model (``spec.sdpa``/``spec.logits``), load ``spec.checkpoint`` (``checkpoint``
    is it already opened) or random weights from ``spec.seed``, fold ``merge`` in (fp32), apply
    ``spec.fuse``, cast to ``spec.dtype`` and quantize the embedding and the linears.

    Deterministic: the same arguments give bit-identical weights."""
    model = build_model(args, seed=spec.seed, sdpa=spec.sdpa, logits=spec.logits)
    source = checkpoint if checkpoint is not None else spec.checkpoint
    if source is not None:
        load_checkpoint(model, source, log=log)
    if merge is not None:
        merge_adapter(model, merge)
    set_fusion(model, spec.fuse)
    if spec.torch_dtype != torch.float32:
        model.to(spec.torch_dtype)
    emb_report = quantize_embedding(model, spec.embedding_bits, spec.embedding_group_size)
    report = quantize_linears(model, spec.qmode, spec.group_size)
    return model, report, emb_report
