"""The quantized base model every program of an export shares.

Built part by part so that memory follows what is written, not fp32 copies of the model: with a
checkpoint, the model is built on the meta device and the checkpoint's (lazily read, memory
mapped) tensors are assigned to it in their own dtype; then each layer in turn -- and last the
embedding, final norm and output layer -- is cast to fp32, has the ``--merge`` adapter folded
in, is fused (``--fuse``), cast to ``--dtype`` and quantized, so only one part's fp32 working copy
exists at a time and the checkpoint's pages of a part are released once it is quantized. Every
step is per module, so the result is bit-identical to doing each step on the whole model. A float
embedding table of a bf16/fp16 checkpoint is kept in that dtype and its rows are cast after the
lookup (exact): at Llama-3.2-1B's vocabulary that is 0.5 GB less in memory and in the file.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import torch
from torch import nn

from edgelora._memory import release_free_memory
from edgelora.export.config import FoundationSpec
from edgelora.export.progress import progress
from edgelora.lora.attach import adapter_attached, merge_adapter
from edgelora.lora.fusion import set_fusion
from edgelora.lora.record import Adapter
from edgelora.models.args import ModelArgs
from edgelora.models.llama import Transformer, build_model
from edgelora.quant.embedding import EmbeddingReport, quantize_embedding
from edgelora.quant.linear import QuantReport, quantize_linears
from edgelora.weights.checkpoint import Checkpoint, load_checkpoint

EMBEDDING = "tok_embeddings"
OUTPUT = "output"


def build_foundation(
    args: ModelArgs,
    spec: FoundationSpec,
    *,
    checkpoint: Checkpoint | None = None,
    merge: Adapter | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Transformer, QuantReport, EmbeddingReport]:
    """Build the model (``spec.sdpa``/``spec.logits``), load ``spec.checkpoint`` (``checkpoint``
    is it already opened; its tensors are handed over to the model) or random weights from
    ``spec.seed``, fold ``merge`` in (fp32), apply ``spec.fuse``, cast to ``spec.dtype`` and
    quantize the embedding and the linears, one part at a time (see the module docstring).

    Deterministic: the same arguments give bit-identical weights."""
    source = checkpoint if checkpoint is not None else spec.checkpoint
    if source is None:
        model = build_model(args, seed=spec.seed, sdpa=spec.sdpa, logits=spec.logits)
    else:
        model = build_model(args, sdpa=spec.sdpa, logits=spec.logits, empty=True)
        load_checkpoint(model, source, assign=True, log=log)
    if merge is not None:
        with adapter_attached(model, merge):  # every module and shape checked before the work
            pass
    report = QuantReport(spec.qmode, spec.group_size, qparams=spec.qparams)
    if spec.output_bits == 8 and spec.qmode != "none":
        report.notes.append(f"{OUTPUT}: 8da8w, one scale per output channel (output_bits 8)")
    emb_report = EmbeddingReport(EMBEDDING, 0, spec.embedding_group_size, 0.0)
    parts = list(_parts(model))
    narrow = _narrow_embedding(model, spec)
    for name, part in progress(parts, "quantize", unit="part"):
        if name == EMBEDDING and narrow:
            # The table stays in the checkpoint's dtype (out of its file's pages); rows are
            # cast to the compute dtype after the lookup, which is exact (TokenEmbedding).
            part.weight = nn.Parameter(part.weight.detach().clone(), part.weight.requires_grad)
            part.out_dtype = spec.torch_dtype
            report.notes.append(
                f"{EMBEDDING}: kept {str(part.weight.dtype).removeprefix('torch.')} as in the "
                f"checkpoint, rows cast to {str(spec.torch_dtype).removeprefix('torch.')} "
                "after the lookup (exact; half the bytes of an upcast table)"
            )
            continue
        part.to(torch.float32)  # from the checkpoint's dtype: merge and quantize in fp32
        piece = _adapter_part(merge, name)
        if piece is not None:
            merge_adapter(model, piece)
        if name.startswith("layers."):
            set_fusion(part, spec.fuse)
        part.to(spec.torch_dtype)
        if name == EMBEDDING:
            emb_report = quantize_embedding(
                model, spec.embedding_bits, spec.embedding_group_size, EMBEDDING
            )
        qmode, group = spec.qmode, spec.group_size
        if name == OUTPUT and spec.output_bits == 8:
            qmode, group = "8da8w", 0  # int8, one scale per output channel (Meta's recipe)
        quantize_linears(
            part, qmode, group, prefix=name, report=report, qparams=spec.qparams
        )  # fmt: skip
    gc.collect()  # the checkpoint's maps and fp32 copies, if a cycle still holds them
    release_free_memory()
    if spec.torch_dtype != torch.float32:
        for key, buf in model._buffers.items():  # the rotary tables and masks, as model.to()
            if buf is not None and buf.is_floating_point():
                model._buffers[key] = buf.to(spec.torch_dtype)
    return model, report, emb_report


def _narrow_embedding(model: Transformer, spec: FoundationSpec) -> bool:
    """Whether the float embedding table keeps the checkpoint's narrower dtype: it is not
    quantized and every value of that dtype is exactly a value of the compute dtype (bf16 or
    fp16 into fp32)."""
    weight = model.tok_embeddings.weight
    return (
        not spec.embedding_bits
        and spec.torch_dtype == torch.float32
        and weight.dtype in (torch.bfloat16, torch.float16)
    )


def _parts(model: Transformer) -> Iterator[tuple[str, nn.Module]]:
    """``(fqn, module)`` of each layer, then of every other child of the model."""
    for i, layer in enumerate(model.layers):
        yield f"layers.{i}", layer
    for name, child in model.named_children():
        if name != "layers":
            yield name, child


def _adapter_part(adapter: Adapter | None, part: str) -> Adapter | None:
    """The modules of ``adapter`` inside ``part`` (``None`` if there are none)."""
    if adapter is None:
        return None
    modules = {f: w for f, w in adapter.modules.items() if f == part or f.startswith(part + ".")}
    if not modules:
        return None
    return Adapter(adapter.name, modules, adapter.source, adapter.scale)
