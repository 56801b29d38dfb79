"""LoRA adapters on disk: PEFT's format (the one users have) and torchtune's.

An adapter directory holds ``adapter_config.json`` and one weights file:

* PEFT: ``adapter_model.safetensors`` (or ``adapter_model.bin``) with keys like
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (optionally with the
  adapter name: ``.lora_A.default.weight``). PEFT trains on Hugging Face models, so the
  ``lora_B`` rows of ``q_proj``/``k_proj`` are in HF's rotary layout and are un-permuted here.
* torchtune: ``adapter_model.pt`` (or ``.safetensors``) with torchtune's keys
  (``layers.0.attn.q_proj.lora_a.weight``), in Meta's rotary layout; its config is PEFT-style.

The whole PEFT LoRA config is honoured: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``
(a list, a regex string or ``"all-linear"``), ``exclude_modules``, ``rank_pattern``,
``alpha_pattern``, ``layers_to_transform``/``layers_pattern``, ``fan_in_fan_out`` and
``bias="none"``, with PEFT's own matching rules. A field this tool cannot honour (DoRA,
``modules_to_save``, embedding or ``lm_head`` LoRA, LoRA biases, weight-modifying inits, ...)
is an :class:`AdapterError` naming it -- never ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgelora._jsonfile import read_json
from edgelora.errors import AdapterError, CheckpointError
from edgelora.models import hf
from edgelora.models.adapters import Adapter, LoRAWeights, validate_adapter_name
from edgelora.models.args import ModelArgs
from edgelora.models.checkpoint import read_state_dict

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TORCHTUNE_WEIGHTS = ("adapter_model.pt",)

# Fields that do not change the adapter's math (training or bookkeeping only).
_INERT_FIELDS = {
    "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
    "lora_dropout", "peft_version", "runtime_config", "megatron_core", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    "layers_pattern", "init_lora_weights", "peft_type", "fan_in_fan_out",
}  # fmt: skip
_SUPPORTED_FIELDS = {
    "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "bias",
}  # fmt: skip
# Inits that rewrite the base weights: the adapter only works on that modified base.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_HINTS = {
    "use_dora": "DoRA adds a magnitude vector per module; merge it into the base with PEFT "
    "(merge_and_unload) and export the merged model",
    "modules_to_save": "the adapter replaces whole modules; merge it with PEFT and export the "
    "merged model",
    "lora_bias": "LoRA biases are not supported; retrain with lora_bias=False",
    "trainable_token_indices": "trained token embeddings are not supported",
    "layer_replication": "layer replication changes the model's depth; not supported",
}

# HF Llama module names an adapter may address, per layer (torchtune adapters are Llama only).
_LAYER_MODULES = {proj: f"{parent}.{proj}" for proj, (parent, _) in hf.HF_PROJECTIONS.items()}
# PEFT's "all-linear": every projection of a layer (either architecture), not the output layer.
_ALL_LINEAR = r"model\.layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(hf.ALL_PROJECTIONS) + ")"


def _projections(args: ModelArgs) -> dict[str, tuple[str, str]]:
    return hf.hf_projections(args.attention_type, args.q_lora_rank)


_UNSUPPORTED_MODULES = {
    "lm_head": "LoRA on the output layer (lm_head) is not supported; retrain without it",
    "model.embed_tokens": "embedding LoRA (embed_tokens) is not supported; retrain without it",
}
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>[\w.]+?)\.lora_(?P<half>A|B)"
    r"(?:\.(?P<name>[A-Za-z_][\w-]*))?\.weight$"
)
_TT_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_(a|b)\.weight$")
_HF_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


@dataclass(frozen=True)
class AdapterConfig:
    """A parsed ``adapter_config.json``: which HF modules are adapted, with which rank/alpha."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def targets(self, key: str) -> bool:
        """PEFT's ``check_target_module_exists`` for an HF module name ``key``."""
        ex = self.exclude_modules
        if isinstance(ex, str) and ex and re.fullmatch(ex, key):
            return False
        if isinstance(ex, tuple) and any(key == e or key.endswith("." + e) for e in ex):
            return False
        if isinstance(self.target_modules, str):  # PEFT ignores layers_to_transform here
            return re.fullmatch(self.target_modules, key) is not None
        if not any(key == t or key.endswith("." + t) for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        patterns = self.layers_pattern or (r"[^.]*",)
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                return int(m.group("idx")) in self.layers_to_transform
        return False

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """PEFT's per-module rank and alpha (first matching ``rank_pattern``/``alpha_pattern``)."""
        r = next((v for p, v in self.rank_pattern.items() if _pattern_matches(p, key)), self.r)
        a = next((v for p, v in self.alpha_pattern.items() if _pattern_matches(p, key)), self.alpha)
        return r, float(a)


def _pattern_matches(pattern: str, key: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(value: Any, field: str, cfg_path: Path) -> str | tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise AdapterError(f"{cfg_path}: field {field!r} is not a valid regex ({e})") from None
        return value
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        # torchtune writes its own projection names; map them onto HF's.
        return tuple(hf.TORCHTUNE_TO_HF.get(t, t) for t in value)
    raise AdapterError(
        f"{cfg_path}: field {field!r} must be a list of module names or a regex string, "
        f"got {value!r}"
    )


def _pattern_dict(value: Any, field: str, cfg_path: Path, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and check(v) for k, v in value.items()
    ):
        raise AdapterError(
            f"{cfg_path}: field {field!r} must map module patterns to "
            f"{'positive integers' if field == 'rank_pattern' else 'numbers'}, got {value!r}"
        )
    return dict(value)


def parse_adapter_config(cfg: Any, cfg_path: Path) -> AdapterConfig:
    """Validate a PEFT LoRA config dict; unsupported or malformed fields raise AdapterError."""
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not supported (LORA only)")
    notes = []
    for key, value in cfg.items():
        if key in _SUPPORTED_FIELDS or key in _INERT_FIELDS or not value:
            continue
        if key == "target_parameters":
            # PEFT >= 0.17 adds MoE expert parameters here for DeepSeek-style models. Parameter
            # LoRA is not supported: any tensor for them fails the key checks in load_adapter.
            notes.append(
                f"target_parameters {value!r} ignored (parameter/MoE-expert LoRA is not "
                "supported; only module tensors are read)"
            )
            continue
        hint = _HINTS.get(key, "this tool does not know what it changes, so it refuses to guess")
        raise AdapterError(f"{cfg_path}: field {key!r}={value!r} is not supported: {hint}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{cfg_path}: field 'init_lora_weights'={cfg['init_lora_weights']!r} rewrites the base "
            "weights; convert the adapter to plain LoRA with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) first"
        )
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise AdapterError(
            f"{cfg_path}: field 'bias'={bias!r} is not supported (it trains the base model's "
            "biases); only 'none'"
        )
    r = cfg.get("r")
    if not _positive_int(r):
        raise AdapterError(f"{cfg_path}: field 'r' must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not _number(alpha):
        raise AdapterError(f"{cfg_path}: field 'lora_alpha' must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _ALL_LINEAR  # PEFT: every linear except the output layer
    targets = _names(targets, "target_modules", cfg_path)
    if not targets:
        raise AdapterError(
            f"{cfg_path}: field 'target_modules' must name the adapted modules "
            f"(e.g. {', '.join(hf.HF_PROJECTIONS)}), got {cfg.get('target_modules')!r}"
        )
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            raise AdapterError(
                f"{cfg_path}: field 'layers_to_transform' must be a layer index or a list of "
                f"them, got {cfg['layers_to_transform']!r}"
            )
        layers = tuple(layers) or None
    pattern = cfg.get("layers_pattern") or ()
    pattern = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    if cfg.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out=true ignored for nn.Linear targets (as PEFT does)")
    return AdapterConfig(
        path=cfg_path,
        r=r,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets,
        exclude_modules=_names(cfg.get("exclude_modules"), "exclude_modules", cfg_path),
        rank_pattern=_pattern_dict(
            cfg.get("rank_pattern"), "rank_pattern", cfg_path, _positive_int
        ),
        alpha_pattern=_pattern_dict(cfg.get("alpha_pattern"), "alpha_pattern", cfg_path, _number),
        layers_to_transform=layers,
        layers_pattern=pattern,
        notes=tuple(notes),
    )


def hf_module_names(args: ModelArgs) -> list[str]:
    """Every HF module name of a model of ``args`` an adapter config can match (unsupported
    ones too)."""
    layer = [f"{parent}.{proj}" for proj, (parent, _) in _projections(args).items()]
    names = [f"model.layers.{i}.{m}" for i in range(args.n_layers) for m in layer]
    return names + list(_UNSUPPORTED_MODULES)


def projection_shape(args: ModelArgs, proj: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of HF projection ``proj`` in a model of ``args``."""
    hidden = args.ffn_hidden_dim
    ffn = {
        "gate_proj": (hidden, args.dim),
        "up_proj": (hidden, args.dim),
        "down_proj": (args.dim, hidden),
    }
    if args.is_mla:
        heads = args.n_heads
        return {
            "q_proj": (heads * args.qk_head_dim, args.dim),
            "q_a_proj": (args.q_lora_rank, args.dim),
            "q_b_proj": (heads * args.qk_head_dim, args.q_lora_rank),
            "kv_a_proj_with_mqa": (args.kv_lora_rank + args.qk_rope_head_dim, args.dim),
            "kv_b_proj": (heads * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank),
            "o_proj": (args.dim, heads * args.v_head_dim),
            **ffn,
        }[proj]
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    return {
        "q_proj": (q, args.dim),
        "k_proj": (kv, args.dim),
        "v_proj": (kv, args.dim),
        "o_proj": (args.dim, q),
        "gate_proj": (hidden, args.dim),
        "up_proj": (hidden, args.dim),
        "down_proj": (args.dim, hidden),
    }[proj]


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
        hf_proj = hf.TORCHTUNE_TO_HF.get(proj)
        if hf_proj is None or hf.HF_PROJECTIONS[hf_proj][0] != {"attn": "self_attn"}.get(
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
        if module in _UNSUPPORTED_MODULES:
            raise AdapterError(
                f"{cfg_path}: target_modules={cfg.target_modules!r} selects {module}: "
                f"{_UNSUPPORTED_MODULES[module]}"
            )
    if not targeted:
        raise AdapterError(
            f"{cfg_path}: target_modules={cfg.target_modules!r} matches no projection of a {arch}"
        )
    halves: dict[str, dict[str, torch.Tensor]] = {}
    layouts: dict[str, str] = {}
    for key, tensor in tensors.items():
        module, half, layout = _module_of(key, weights_path)
        if module in _UNSUPPORTED_MODULES:
            raise AdapterError(f"{weights_path}: key {key!r}: {_UNSUPPORTED_MODULES[module]}")
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

    adapter = Adapter(name=name, source=str(path), scale=float(scale), notes=list(cfg.notes))
    for module in targeted:
        pair = halves[module]
        if set(pair) != {"A", "B"}:
            absent = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{weights_path}: module {module} has no lora_{absent} weight")
        layer, _, proj = _HF_MODULE.match(module).groups()
        rank, alpha = cfg.rank_alpha(module)
        out_f, in_f = projection_shape(args, proj)
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
        heads = hf.rope_heads(proj, args.n_heads, args.kv_heads, mla=args.is_mla)
        if heads is not None and layouts[module] == "peft":
            b = hf.hf_to_meta_rows(b, heads)
        fqn = f"layers.{layer}.{projections[proj][1]}"
        adapter.modules[fqn] = LoRAWeights(a, b, alpha, cfg.use_rslora)
    return adapter


def _hf_key(fqn: str) -> tuple[str, str]:
    """Our ``layers.N.attention.wq`` -> (HF module name, HF projection)."""
    _, layer, *rest = fqn.split(".")
    path = ".".join(rest)
    proj, parent = next((p, par) for p, (par, ours) in hf.ALL_PROJECTIONS.items() if ours == path)
    return f"model.layers.{layer}.{parent}.{proj}", proj


def _config_for(adapter: Adapter) -> dict[str, Any]:
    """A PEFT config reproducing ``adapter``'s per-module ranks/alphas exactly."""
    modules = {_hf_key(fqn)[0]: w for fqn, w in adapter.modules.items()}
    ranks = [w.rank for w in modules.values()]
    alphas = [w.alpha for w in modules.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        # Exact module names as a regex: the adapted set, no more.
        "target_modules": "|".join(re.escape(m) for m in sorted(modules)),
        "rank_pattern": {f"^{re.escape(m)}": w.rank for m, w in modules.items() if w.rank != r},
        "alpha_pattern": {
            f"^{re.escape(m)}": w.alpha for m, w in modules.items() if w.alpha != alpha
        },
        "use_rslora": any(w.use_rslora for w in adapter.modules.values()),
        "bias": "none",
    }


def save_peft_adapter(adapter: Adapter, path: str | Path, args: ModelArgs) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (HF key names and rotary layout)."""
    from safetensors.torch import save_file

    if len({w.use_rslora for w in adapter.modules.values()}) > 1:
        raise AdapterError("save_peft_adapter: modules disagree on use_rslora")
    path = Path(path)
    tensors = {}
    for fqn, w in adapter.modules.items():
        module, proj = _hf_key(fqn)
        b = w.lora_b
        heads = hf.rope_heads(proj, args.n_heads, args.kv_heads, mla=args.is_mla)
        if heads is not None:
            b = hf.meta_to_hf_rows(b, heads)
        tensors[f"base_model.model.{module}.lora_A.weight"] = w.lora_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(_config_for(adapter), indent=2) + "\n")
    save_file(tensors, str(path / PEFT_WEIGHTS[0]))
    return path


def save_torchtune_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` the way torchtune's LoRA recipes do: ``adapter_model.pt`` with torchtune
    key names (Meta rotary layout) and a PEFT-style ``adapter_config.json``."""
    path = Path(path)
    to_tt = {v: k for k, v in hf.TORCHTUNE_TO_HF.items()}
    tensors = {}
    for fqn, w in adapter.modules.items():
        module, proj = _hf_key(fqn)
        layer = fqn.split(".")[1]
        parent = "attn" if hf.HF_PROJECTIONS[proj][0] == "self_attn" else "mlp"
        base = f"layers.{layer}.{parent}.{to_tt[proj]}"
        tensors[f"{base}.lora_a.weight"] = w.lora_a.contiguous()
        tensors[f"{base}.lora_b.weight"] = w.lora_b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(_config_for(adapter), indent=2) + "\n")
    torch.save(tensors, path / TORCHTUNE_WEIGHTS[0])
    return path
