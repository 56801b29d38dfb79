"""PEFT's LoRA config semantics: which modules an ``adapter_config.json`` adapts, with which
rank and alpha -- PEFT's own matching rules -- and the config that reproduces an adapter.

The whole PEFT LoRA config is honoured: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``
(a list, a regex string or ``"all-linear"``), ``exclude_modules``, ``rank_pattern``,
``alpha_pattern``, ``layers_to_transform``/``layers_pattern``, ``fan_in_fan_out`` and
``bias="none"``. A field this tool cannot honour (DoRA, ``modules_to_save``, embedding or
``lm_head`` LoRA, LoRA biases, weight-modifying inits, ...) is an :class:`AdapterError` naming
it -- never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from edgelora.errors import AdapterError
from edgelora.lora.record import Adapter
from edgelora.weights import hf_keys
from edgelora.weights.families import all_projections
from edgelora.weights.families.base import LLAMA_PROJECTIONS

CONFIG_FILE = "adapter_config.json"
# A config's regexes come from whoever wrote the adapter: each match gets this long, so a
# catastrophic one ("(m|m)*x") is an error naming it, not a hang. Module names are short.
REGEX_TIMEOUT_S = 1.0
UNSUPPORTED_MODULES = {
    "lm_head": "LoRA on the output layer (lm_head) is not supported; retrain without it",
    "model.embed_tokens": "embedding LoRA (embed_tokens) is not supported; retrain without it",
}

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


def _all_linear() -> str:
    """PEFT's "all-linear": every projection of a layer (any registered family's), not the
    output layer."""
    names = "|".join(all_projections())
    return r"model\.layers\.\d+\.(?:self_attn|mlp)\.(?:" + names + ")"


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
        if isinstance(ex, str) and ex and _search("fullmatch", ex, key, self.path):
            return False
        if isinstance(ex, tuple) and any(key == e or key.endswith("." + e) for e in ex):
            return False
        if isinstance(self.target_modules, str):  # PEFT ignores layers_to_transform here
            return _search("fullmatch", self.target_modules, key, self.path) is not None
        if not any(key == t or key.endswith("." + t) for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        patterns = self.layers_pattern or (r"[^.]*",)
        for pattern in patterns:
            m = _search("match", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, self.path)
            if m is not None:
                return int(m.group("idx")) in self.layers_to_transform
        return False

    def rank_alpha(self, key: str) -> tuple[int, float]:
        """PEFT's per-module rank and alpha (first matching ``rank_pattern``/``alpha_pattern``)."""

        def first(patterns, default):
            return next((v for p, v in patterns.items() if self._matches(p, key)), default)

        return first(self.rank_pattern, self.r), float(first(self.alpha_pattern, self.alpha))

    def _matches(self, pattern: str, key: str) -> bool:
        return _search("match", rf"(.*\.)?({pattern})$", key, self.path) is not None


def _search(how: str, pattern: str, key: str, cfg_path: Path):
    """``regex.<how>(pattern, key)`` (``re``'s semantics) within :data:`REGEX_TIMEOUT_S`."""
    try:
        return getattr(regex, how)(pattern, key, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise AdapterError(
            f"{cfg_path}: the pattern {pattern[:80]!r} takes more than {REGEX_TIMEOUT_S:g} s to "
            f"match the module name {key!r} (a catastrophic regex); simplify it"
        ) from None
    except regex.error as e:
        raise AdapterError(f"{cfg_path}: {pattern[:80]!r} is not a valid regex ({e})") from None


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
        return tuple(hf_keys.TORCHTUNE_TO_HF.get(t, t) for t in value)
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
        targets = _all_linear()  # PEFT: every linear except the output layer
    targets = _names(targets, "target_modules", cfg_path)
    if not targets:
        raise AdapterError(
            f"{cfg_path}: field 'target_modules' must name the adapted modules "
            f"(e.g. {', '.join(LLAMA_PROJECTIONS)}), got {cfg.get('target_modules')!r}"
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


def hf_module_of(fqn: str) -> tuple[str, str]:
    """Our ``layers.N.attention.wq`` -> (HF module name, HF projection)."""
    _, layer, *rest = fqn.split(".")
    path = ".".join(rest)
    proj, parent = next((p, par) for p, (par, ours) in all_projections().items() if ours == path)
    return f"model.layers.{layer}.{parent}.{proj}", proj


def config_for(adapter: Adapter) -> dict[str, Any]:
    """A PEFT config reproducing ``adapter``'s per-module ranks/alphas exactly."""
    modules = {hf_module_of(fqn)[0]: w for fqn, w in adapter.modules.items()}
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
