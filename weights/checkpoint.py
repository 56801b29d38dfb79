"""Read model checkpoints in the layouts users have, and load them into a ``Transformer``.

:func:`open_checkpoint` accepts

* a Hugging Face Llama directory: ``config.json`` + ``model.safetensors``, sharded
  ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``, or
  ``pytorch_model.bin`` (q/k rows are un-permuted to Meta's rotary layout, see
  :mod:`edgelora.weights.hf_keys`; a missing ``lm_head.weight`` means tied embeddings);
* a Meta directory: ``params.json`` + ``consolidated.00.pth``;
* a single file in Meta/ExecuTorch naming (``layers.0.attention.wq.weight``, this tool's own),
  torchtune naming (``layers.0.attn.q_proj.weight``, ``sa_norm.scale``) or HF naming (with a
  ``config.json`` beside it).

``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: never unpickled
beyond tensors. Every result is in the model's own key names. Weight files are memory-mapped
and read lazily, in the checkpoint's own dtype (see :mod:`edgelora.weights.tensor_files`):
opening a checkpoint reads little more than its headers, and
``load_checkpoint(..., assign=True)`` into a model built with ``build_model(empty=True)`` makes
no copy until a layer is cast or quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelora._jsonfile import read_json
from edgelora.errors import CheckpointError
from edgelora.models.args import ModelArgs
from edgelora.weights import hf_keys
from edgelora.weights.architectures import args_from_hf_config, find_architecture
from edgelora.weights.layout import to_model_layout
from edgelora.weights.tensor_files import all_finite, read_state_dict

HF_CONFIG = "config.json"
# Tokenizer files an export copies from a Hugging Face directory (tokenizer.json is what
# ExecuTorch's runner reads; the config carries the chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
META_PARAMS = "params.json"
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """A checkpoint read into this model's key names.

    ``params`` holds the ``ModelArgs`` fields found beside the weights (HF ``config.json`` or
    Meta ``params.json``), or None for a bare file. ``layout`` is ``"hf"``, ``"meta"`` (also this
    tool's own) or ``"torchtune"``; ``notes`` lists the conversions applied, for the log.
    """

    path: Path
    layout: str
    state_dict: dict[str, torch.Tensor]
    params: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_id, eos_ids
    tokenizer_files: list[Path] = field(default_factory=list)  # to ship with the export

    def take_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors, handed over: this checkpoint holds none afterwards, so they (and their
        memory maps) are freed as soon as the new owner lets them go."""
        sd, self.state_dict = self.state_dict, {}
        return sd

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's (most common) floating dtype."""
        counts: dict[torch.dtype, int] = {}
        for t in self.state_dict.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        return max(counts, key=counts.get) if counts else torch.float32


def _read_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    for index_name in _HF_INDEXES:
        index_path = root / index_name
        if index_path.is_file():
            index = read_json(index_path, CheckpointError, "checkpoint index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            for shard in weight_map.values():  # (fuzzing: a dict here was a TypeError)
                if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".."):
                    raise CheckpointError(f"{index_path}: bad shard file name {shard!r}")
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                part = read_state_dict(root / shard, lazy=True)
                for key in part:
                    if weight_map.get(key) != shard:
                        raise CheckpointError(
                            f"{root / shard}: key {key!r} is not listed for this shard in "
                            f"{index_name}"
                        )
                sd.update(part)
            absent = sorted(set(weight_map) - set(sd))
            if absent:
                raise CheckpointError(
                    f"{index_path}: {len(absent)} key(s) listed but not in any shard, e.g. "
                    f"{absent[:3]}"
                )
            return sd
    for name in _HF_WEIGHTS:
        if (root / name).is_file():
            return read_state_dict(root / name, lazy=True)
    raise CheckpointError(
        f"{root}: Hugging Face directory without weights (expected one of "
        f"{', '.join(_HF_WEIGHTS + _HF_INDEXES)})"
    )


def _special_tokens(root: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """``bos_id``/``eos_ids`` from ``generation_config.json`` (what generation uses) over
    ``config.json``; ``eos_token_id`` may be a list (all of them end generation)."""
    gen_path = root / "generation_config.json"
    gen = read_json(gen_path, CheckpointError, "generation config") if gen_path.is_file() else {}
    out: dict[str, Any] = {}
    for source in (cfg, gen if isinstance(gen, dict) else {}):
        bos, eos = source.get("bos_token_id"), source.get("eos_token_id")
        if isinstance(bos, int) and not isinstance(bos, bool):
            out["bos_id"] = bos
        if isinstance(eos, int) and not isinstance(eos, bool):
            eos = [eos]
        if isinstance(eos, list) and eos and all(isinstance(e, int) for e in eos):
            out["eos_ids"] = list(eos)
    return out


def _hf_checkpoint(root: Path, sd: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    cfg_path = root / HF_CONFIG
    cfg = read_json(cfg_path, CheckpointError, "Hugging Face config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    arch = find_architecture(cfg, str(cfg_path))
    params = args_from_hf_config(cfg, str(cfg_path))
    args = ModelArgs.from_dict(params, source=str(cfg_path))  # the shapes the names map onto
    tied = "lm_head.weight" not in sd
    ours = arch.state_dict_to_ours(sd, args, str(path))  # one tensor at a time, by its family
    if args.is_mla:
        notes = ["Hugging Face DeepSeek-V3 layout (dense MLA layers), split wq_a/wkv_a"]
    else:
        notes = [f"Hugging Face {arch.label} layout: q/k rows un-permuted to Meta's rotary layout"]
    if tied:
        notes.append("no lm_head.weight: output tied to the token embedding")
    ckpt = Checkpoint(path, "hf", ours, params, notes)
    ckpt.special_tokens = _special_tokens(root, cfg)
    ckpt.tokenizer_files = [root / n for n in TOKENIZER_FILES if (root / n).is_file()]
    return ckpt


def _meta_params(path: Path, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    params = read_json(path, CheckpointError, "Meta params file")
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    vocab = params.get("vocab_size")
    emb = sd.get("tok_embeddings.weight")
    if isinstance(vocab, int) and vocab <= 0 and emb is not None:
        params = {**params, "vocab_size": emb.shape[0]}  # Llama 2's params.json says -1
    return params


def _file_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Checkpoint:
    if hf_keys.is_hf_state_dict(sd):
        if not (path.parent / HF_CONFIG).is_file():
            raise CheckpointError(
                f"{path}: Hugging Face key names but no {HF_CONFIG} beside it (pass the model "
                "directory)"
            )
        return _hf_checkpoint(path.parent, sd, path)
    if hf_keys.is_torchtune_state_dict(sd):
        ours = hf_keys.torchtune_state_dict_to_ours(sd, source=str(path))
        return Checkpoint(path, "torchtune", ours, None, ["torchtune key names renamed"])
    return Checkpoint(path, "meta", sd)


# What a checkpoint's weights and shapes are read from (tokenizer and generation settings are
# not: they do not change the foundation).
_DIGESTED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pth",
             "*.pt", HF_CONFIG, META_PARAMS)  # fmt: skip


def checkpoint_digest(path: str | Path) -> str:
    """A sha256 naming a checkpoint's content: of a file, its bytes; of a directory, every file
    its weights and config are read from (weights, indexes, ``config.json``/``params.json``)
    with their names. The same bytes give the same digest wherever they are."""
    import hashlib

    from edgelora.format.layout import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = sorted({f for pattern in _DIGESTED for f in path.glob(pattern) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file or directory (see the module docstring) into our key names.

    Raises :class:`CheckpointError` naming the file for anything unreadable or unrecognised,
    and :class:`ConfigError` for an unsupported architecture in ``config.json``.
    """
    path = Path(path)
    if path.is_dir():
        if (path / HF_CONFIG).is_file():
            return _hf_checkpoint(path, _read_hf_weights(path), path)
        shards = sorted(path.glob("consolidated.*.pth"))
        if (path / META_PARAMS).is_file() and shards:
            if len(shards) > 1:
                raise CheckpointError(
                    f"{path}: {len(shards)} model-parallel shards (consolidated.00.pth ...); "
                    "merge them into one consolidated.00.pth first"
                )
            ckpt = _file_checkpoint(shards[0], read_state_dict(shards[0], lazy=True))
            ckpt.params = _meta_params(path / META_PARAMS, ckpt.state_dict)
            return ckpt
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected {HF_CONFIG} + model.safetensors, "
            f"or {META_PARAMS} + consolidated.00.pth)"
        )
    return _file_checkpoint(path, read_state_dict(path, lazy=True))


def load_checkpoint(
    model: nn.Module,
    path: str | Path | Checkpoint,
    *,
    assign: bool = False,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly: every key must exist with the same shape.

    Tensors of fusable blocks are converted to the layout the model has (fused ``wqkv`` rows
    split for a split model, split ``wq_a``/``wkv_a`` concatenated for a fused MLA one, ...; see
    :mod:`edgelora.weights.layout`), and ``log`` is told so.

    ``path`` is anything :func:`open_checkpoint` reads, or its result. Tensors are cast to the
    model's dtype (a bf16/fp16 checkpoint computes in fp32 unless the model is built otherwise).
    With ``assign=True`` the checkpoint's tensors become the model's parameters as they are
    (its dtype, no copy; the model may be built on the meta device, see
    ``build_model(empty=True)``), and the :class:`Checkpoint` hands them over
    (:meth:`Checkpoint.take_state_dict`).
    Raises :class:`CheckpointError` naming the missing/unexpected keys or the mismatched shapes.
    """
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    path = ckpt.path
    sd = ckpt.take_state_dict() if assign else dict(ckpt.state_dict)
    try:
        notes = to_model_layout(model, sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(parts))
    checked = set()  # (storage, size): a tied alias is checked once
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: key {key!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(expected[key].shape)} (check params.json against the checkpoint)"
            )
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: key {key!r} has dtype {tensor.dtype}, expected float")
        seen = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if seen not in checked and not all_finite(tensor):
            raise CheckpointError(f"{path}: key {key!r} holds NaN or infinite values")
        checked.add(seen)
    if assign:
        model.load_state_dict(sd, assign=True)
    else:
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})
    del sd
    for note in notes:
        ckpt.notes.append(note)
        if log is not None:
            log(f"  checkpoint: {note}")
    return model
