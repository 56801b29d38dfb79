"""LoRA adapters on disk: PEFT's format (the one users have) and torchtune's.

An adapter directory holds ``adapter_config.json`` and one weights file:

* PEFT: ``adapter_model.safetensors`` (or ``adapter_model.bin``) with keys like
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (optionally with the
  adapter name: ``.lora_A.default.weight``). PEFT trains on Hugging Face models, so the
  ``lora_B`` rows of ``q_proj``/``k_proj`` are in HF's rotary layout and are un-permuted here.
* torchtune: ``adapter_model.pt`` (or ``.safetensors``) with torchtune's keys
  (``layers.0.attn.q_proj.lora_a.weight``), in Meta's rotary layout; its config is PEFT-style.

The config's semantics (which modules, rank and alpha) are :mod:`edgelora.weights.peft_config`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from edgelora._jsonfile import read_json
from edgelora.errors import AdapterError, CheckpointError
from edgelora.lora.record import Adapter, LoRAWeights, validate_adapter_name
from edgelora.models.args import ModelArgs
from edgelora.weights import hf_keys
from edgelora.weights.families import family_of
from edgelora.weights.families.base import LLAMA_PROJECTIONS
from edgelora.weights.peft_config import (
    CONFIG_FILE,
    UNSUPPORTED_MODULES,
    config_for,
    hf_module_of,
    parse_adapter_config,
)
from edgelora.weights.tensor_files import read_state_dict

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TORCHTUNE_WEIGHTS = ("adapter_model.pt",)
# HF Llama module names an adapter may address, per layer (torchtune adapters are Llama only).
_LAYER_MODULES = {proj: f"{parent}.{proj}" for proj, (parent, _) in LLAMA_PROJECTIONS.items()}


def _projections(args: ModelArgs) -> dict[str, tuple[str, str]]:
    return family_of(args).layer_projections(args)


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>[\w.]+?)\.lora_(?P<half>A|B)"
    r"(?:\.(?P<name>[A-Za-z_][\w-]*))?\.weight$"
)
_TT_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_(a|b)\.weight$")
_HF_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def hf_module_names(args: ModelArgs) -> list[str]:
    """Every HF module name of a model of ``args`` an adapter config can match (unsupported
    ones too)."""
    layer = [f"{parent}.{proj}" for proj, (parent, _) in _projections(args).items()]
    names = [f"model.layers.{i}.{m}" for i in range(args.n_layers) for m in layer]
    return names + list(UNSUPPORTED_MODULES)


def projection_shape(args: ModelArgs, proj: str, layer: int = 0) -> tuple[int, int]:
    """``(out_features, in_features)`` of HF projection ``proj`` in layer ``layer`` of a model
    of ``args``, read from the module tree (:func:`_layer_shapes`)."""
    return _layer_shapes(args, layer)[_projections(args)[proj][1]]


@functools.lru_cache(maxsize=16)
def _layer_shapes(args: ModelArgs, layer: int) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every linear of one layer, built on the meta device (no memory), and of
    each fused piece a checkpoint may name (``wqkv``: its slices' rows together)."""
    from edgelora.models.llama import TransformerBlock

    with torch.device("meta"):
        block = TransformerBlock(args, layer)
    shapes = {
        name: (m.out_features, m.in_features)
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }
    for name, m in block.named_modules():
        for piece, slices in getattr(m, "PIECE_SLICES", {}).items():
            parts = [shapes.get(f"{name}.{s}") for s in slices]
            if all(parts):
                shapes.setdefault(f"{name}.{piece}", (sum(o for o, _ in parts), parts[0][1]))
    return shapes


def _find_weights(path: Path) -> tuple[Path, str]:
    for name in PEFT_WEIGHTS:
        if (path / name).is_file():
            return path / name, "peft"
    for name in TORCHTUNE_WEIGHTS:
        if (path / name).is_file():
            return path / name, "torchtune"
    raise AdapterError(
        f"{path}: adapter weights not found (expected one of "
        f"{', '.join(PEFT_WEIGHTS + TORCHTUNE_WEIGHTS)})"
    )


def _module_of(key: str, weights_path: Path) -> tuple[str, str, str]:
    """``(hf module name, 'A'|'B', key layout)`` of one adapter tensor key."""
    if m := _TT_KEY.match(key):
        layer, parent, proj, half = m.groups()
        hf_proj = hf_keys.TORCHTUNE_TO_HF.get(proj)
        if hf_proj is None or LLAMA_PROJECTIONS[hf_proj][0] != {"attn": "self_attn"}.get(
            parent, parent
        ):
            raise AdapterError(f"{weights_path}: key {key!r} names unknown projection {proj}")
        return f"model.layers.{layer}.{_LAYER_MODULES[hf_proj]}", half.upper(), "torchtune"
    if key.startswith("output.lora_"):
        return "lm_head", key[len("output.lora_")].upper(), "torchtune"
    if m := _PEFT_KEY.match(key):
        return m.group("module"), m.group("half"), "peft"
    raise AdapterError(
        f"{weights_path}: key {key!r} is not a LoRA weight (expected e.g. "
        "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')"
    )


def load_adapter(
    path: str | Path, args: ModelArgs, name: str | None = None, *, scale: float = 1.0
) -> Adapter:
    """Read a PEFT or torchtune LoRA adapter directory for a model of shape ``args``.

    ``scale`` multiplies the adapter's contribution (llama.cpp's ``--lora-scaled``). Raises
    :class:`AdapterError` naming the file, key and shapes for an unsupported config field, a key
    that is no LoRA weight, a targeted module without tensors, tensors for a module the config
    does not target, ranks that disagree with the config, shapes that do not fit ``args``, or
    NaN/inf values.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    name = validate_adapter_name(name if name is not None else path.name)
    if not (isinstance(scale, (int, float)) and torch.isfinite(torch.tensor(float(scale)))):
        raise AdapterError(f"adapter {name!r}: scale must be a finite number, got {scale!r}")
    cfg_path = path / CONFIG_FILE
    cfg = parse_adapter_config(read_json(cfg_path, AdapterError, "adapter config"), cfg_path)
    weights_path, _ = _find_weights(path)
    try:
        tensors = read_state_dict(weights_path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None

    projections = _projections(args)
    arch = f"{args.n_layers}-layer {'DeepSeek (MLA)' if args.is_mla else 'Llama'}"
    all_modules = hf_module_names(args)
    if isinstance(cfg.target_modules, tuple):
        unmatched = [
            t
            for t in cfg.target_modules
            if not any(m == t or m.endswith("." + t) for m in all_modules)
        ]
        if unmatched:
            raise AdapterError(
                f"{cfg_path}: target_modules {unmatched} match no module of a "
                f"{arch} (its projections: {', '.join(projections)})"
            )
    targeted = [m for m in all_modules if cfg.targets(m)]
    for module in targeted:
        if module in UNSUPPORTED_MODULES:
            raise AdapterError(
                f"{cfg_path}: target_modules={cfg.target_modules!r} selects {module}: "
                f"{UNSUPPORTED_MODULES[module]}"
            )
    if not targeted:
        raise AdapterError(
            f"{cfg_path}: target_modules={cfg.target_modules!r} matches no projection of a {arch}"
        )
    halves: dict[str, dict[str, torch.Tensor]] = {}
    layouts: dict[str, str] = {}
    for key, tensor in tensors.items():
        module, half, layout = _module_of(key, weights_path)
        if module in UNSUPPORTED_MODULES:
            raise AdapterError(f"{weights_path}: key {key!r}: {UNSUPPORTED_MODULES[module]}")
        if _HF_MODULE.match(module) is None or module not in all_modules:
            raise AdapterError(
                f"{weights_path}: key {key!r} adapts {module}, which is not a projection of this "
                f"model ({arch}: {', '.join(projections)})"
            )
        if not cfg.targets(module):
            raise AdapterError(
                f"{weights_path}: key {key!r} adapts {module}, which {cfg_path.name} does not "
                f"target (target_modules={cfg.target_modules!r}, layers_to_transform="
                f"{cfg.layers_to_transform})"
            )
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise AdapterError(
                f"{weights_path}: key {key!r} must be a 2-D float tensor, got "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: key {key!r} holds NaN or infinite values")
        if half in halves.get(module, {}):
            raise AdapterError(f"{weights_path}: module {module} has two lora_{half} tensors")
        halves.setdefault(module, {})[half] = tensor.float()
        layouts[module] = layout

    missing = [m for m in targeted if m not in halves]
    if missing:
        raise AdapterError(
            f"{weights_path}: no tensors for {len(missing)} targeted module(s), e.g. "
            f"{missing[:3]} (is the adapter for a model with {args.n_layers} layers?)"
        )

    adapter = Adapter(
        name=name, source=os.path.realpath(path), scale=float(scale), notes=list(cfg.notes)
    )
    for module in targeted:
        pair = halves[module]
        if set(pair) != {"A", "B"}:
            absent = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{weights_path}: module {module} has no lora_{absent} weight")
        layer, _, proj = _HF_MODULE.match(module).groups()
        rank, alpha = cfg.rank_alpha(module)
        out_f, in_f = projection_shape(args, proj, int(layer))
        a, b = pair["A"], pair["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: module {module} has lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)}, but {cfg_path.name} gives it rank {rank}"
            )
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise AdapterError(
                f"{weights_path}: module {module} (layers.{layer}.{projections[proj][1]}) "
                f"is [{out_f} x {in_f}] in this model, so lora_A "
                f"must be {[rank, in_f]} and lora_B {[out_f, rank]}; got {list(a.shape)} and "
                f"{list(b.shape)} (an adapter for another model?)"
            )
        if layouts[module] == "peft":
            b = hf_keys.rotary_rows(b, proj, args)
        fqn = f"layers.{layer}.{projections[proj][1]}"
        adapter.modules[fqn] = LoRAWeights(a, b, alpha, cfg.use_rslora)
    return adapter


def save_peft_adapter(adapter: Adapter, path: str | Path, args: ModelArgs) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (HF key names and rotary layout)."""
    from safetensors.torch import save_file

    if len({w.use_rslora for w in adapter.modules.values()}) > 1:
        raise AdapterError("save_peft_adapter: modules disagree on use_rslora")
    path = Path(path)
    tensors = {}
    for fqn, w in adapter.modules.items():
        module, proj = hf_module_of(fqn)
        b = hf_keys.rotary_rows(w.lora_b, proj, args, to_meta=False)
        tensors[f"base_model.model.{module}.lora_A.weight"] = w.lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config_for(adapter), indent=2) + "\n")
    save_file(tensors, str(path / PEFT_WEIGHTS[0]))
    return path


def save_torchtune_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` the way torchtune's LoRA recipes do: ``adapter_model.pt`` with torchtune
    key names (Meta rotary layout) and a PEFT-style ``adapter_config.json``."""
    path = Path(path)
    to_tt = {v: k for k, v in hf_keys.TORCHTUNE_TO_HF.items()}
    tensors = {}
    for fqn, w in adapter.modules.items():
        module, proj = hf_module_of(fqn)
        layer = fqn.split(".")[1]
        parent = "attn" if LLAMA_PROJECTIONS[proj][0] == "self_attn" else "mlp"
        base = f"layers.{layer}.{parent}.{to_tt[proj]}"
        tensors[f"{base}.lora_a.weight"] = w.lora_a.contiguous()
        tensors[f"{base}.lora_b.weight"] = w.lora_b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config_for(adapter), indent=2) + "\n")
    torch.save(tensors, path / TORCHTUNE_WEIGHTS[0])
    return path
