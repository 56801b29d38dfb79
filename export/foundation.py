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
from contextlib import contextmanager

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
    output_qmode = spec.output
    if output_qmode != spec.qmode:
        report.notes.append(f"{OUTPUT}: {output_qmode}" + _PER_CHANNEL.get(output_qmode, ""))
    emb_report = EmbeddingReport(EMBEDDING, 0, spec.embedding_group_size, 0.0)
    parts = list(_parts(model))
    narrow = _narrow_embedding(model, spec)

    def prepare(name: str, part: nn.Module) -> bool:
        """Cast, merge and fuse one part; False for the float embedding (nothing to quantize)."""
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
            return False
        part.to(torch.float32)  # from the checkpoint's dtype: merge and quantize in fp32
        piece = _adapter_part(merge, name)
        if piece is not None:
            merge_adapter(model, piece)
        if name.startswith("layers."):
            set_fusion(part, spec.fuse)
        part.to(spec.torch_dtype)
        return True

    calibration = None
    if spec.calibrated:  # the whole float model first: calibration runs it
        keep = {name: prepare(name, part) for name, part in progress(parts, "prepare", unit="part")}
        calibration = _calibrate(model, spec, log)
        report.sensitivity = calibration.sensitivity
        report.calibration = calibration.calibration
    for name, part in progress(parts, "quantize", unit="part"):
        if not (keep[name] if calibration is not None else prepare(name, part)):
            continue
        if name == EMBEDDING:
            emb_report = quantize_embedding(
                model, spec.embedding_bits, spec.embedding_group_size, EMBEDDING
            )
        qmode, group = spec.qmode, spec.group_size
        if name == OUTPUT:
            qmode = output_qmode
            group = spec.group_size if qmode == "8da4w" else 0
        quantize_linears(
            part,
            qmode,
            group,
            prefix=name,
            report=report,
            qparams=spec.qparams,
            plan=None if calibration is None else calibration.plan,
            custom=None if calibration is None else calibration.custom,
        )
    gc.collect()  # the checkpoint's maps and fp32 copies, if a cycle still holds them
    release_free_memory()
    if spec.torch_dtype != torch.float32:
        for key, buf in model._buffers.items():  # the rotary tables and masks, as model.to()
            if buf is not None and buf.is_floating_point():
                model._buffers[key] = buf.to(spec.torch_dtype)
    return model, report, emb_report


_PER_CHANNEL = {"8da8w": ", one scale per output channel", "8w": ", one scale per output channel"}


def _calibrate(model: Transformer, spec: FoundationSpec, log: Callable[[str], None] | None):
    """GPTQ and the measured upgrades of the recipe on the float ``model``
    (:mod:`edgelora.quant.calibrate`)."""
    import time
    from pathlib import Path

    from edgelora.quant.calibrate import calibration_ids

    start = time.perf_counter()
    calibration = calibration_ids(
        None if spec.calibration is None else Path(spec.calibration),
        None if spec.tokenizer is None else Path(spec.tokenizer),
        model.args.vocab_size,
        chunk=min(256, model.args.max_seq_len),
    )
    with _plain_attention(model):
        result = _calibrate_with(model, calibration, spec)
    if log is not None:
        log(
            f"  calibrated on {calibration.tokens} tokens of {calibration.source} in "
            f"{time.perf_counter() - start:.1f} s: GPTQ {len(result.custom)} linears, "
            f"{len(result.plan)} most sensitive {spec.upgrade_qmode}"
        )
    return result


def _calibrate_with(model: Transformer, calibration, spec: FoundationSpec):
    from edgelora.lora.attach import adapter_fqns
    from edgelora.quant.calibrate import calibrate_model

    return calibrate_model(
        model,
        calibration,
        group_size=spec.group_size,
        gptq=spec.gptq and spec.qmode == "8da4w",
        upgrade=spec.upgrade,
        upgrade_qmode=spec.upgrade_qmode,
        qparams=spec.qparams,
        exclude=frozenset({OUTPUT}) | adapter_fqns(model),
        progress=lambda it, desc: progress(it, desc, unit="linear"),
    )


@contextmanager
def _plain_attention(model: Transformer) -> Iterator[None]:
    """Run the model's attention on plain PyTorch ops (its own KV caches swapped for plain
    ones) while calibrating: what calibration measures -- and so the weights -- do not depend
    on the attention kernels the export traces (the eager reference of the output-match check
    runs plain attention), and ExecuTorch's custom ops log nothing from here."""
    from edgelora.models.layers import CustomKVCache, KVCache

    swapped = []
    for layer in getattr(model, "layers", []):
        attention = layer.attention
        cache = getattr(attention, "kv_cache", None)
        if isinstance(cache, CustomKVCache):
            args = model.args
            attention.kv_cache = KVCache(
                args.kv_heads, args.max_seq_len, args.head_dim, args.head_dim
            )
            swapped.append((attention, cache))
    try:
        yield
    finally:
        for attention, cache in swapped:
            attention.kv_cache = cache


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
