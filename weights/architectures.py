"""Hugging Face architectures: which family reads a ``config.json`` (by its ``architectures``
names, else its ``model_type``), and the ``ModelArgs`` fields it gives. The families themselves,
one class per file, are in :mod:`edgelora.weights.families`; an unknown architecture is refused
by name, and some by a reason (:data:`_REFUSED`).
"""

from __future__ import annotations

from typing import Any

from edgelora.errors import ConfigError
from edgelora.weights.families import REGISTRY, Family, check_field_types, registered

# Architectures refused with a reason (rather than "not supported").
_REFUSED = {
    "Gemma3ForConditionalGeneration": "a vision-language checkpoint; export its text model "
    "(Gemma3ForCausalLM) instead",
    "Qwen3MoeForCausalLM": "mixture-of-experts layers are not supported",
    "Qwen2MoeForCausalLM": "mixture-of-experts layers are not supported",
    "MixtralForCausalLM": "mixture-of-experts layers are not supported",
    "PhiMoEForCausalLM": "mixture-of-experts layers are not supported",
}


def find_architecture(cfg: dict[str, Any], source: str) -> type[Family]:
    """The registered architecture of a ``config.json`` (by ``architectures``, else
    ``model_type``); :class:`ConfigError` naming it and the supported ones otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{source}: 'architectures' must be a list of names, got {archs!r:.80}")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{source}: 'model_type' must be a string, got {model_type!r:.80}")
    for name in archs:
        if name in REGISTRY:
            return REGISTRY[name]
    families = registered()
    for arch in families if not archs else ():
        if model_type == arch.model_type:
            return arch
    supported = ", ".join(sorted(REGISTRY))
    for name in archs:
        if name in _REFUSED:
            raise ConfigError(f"{source}: architecture {name} is not supported: {_REFUSED[name]}")
    if archs:
        raise ConfigError(
            f"{source}: architecture {', '.join(map(str, archs))} is not supported "
            f"(supported: {supported})"
        )
    raise ConfigError(
        f"{source}: model_type {model_type!r} is not supported (need one of "
        f"{', '.join(sorted(repr(a.model_type) for a in families))})"
    )


def args_from_hf_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``ModelArgs`` fields from a Hugging Face ``config.json`` of a registered architecture
    (field types checked first: a wrong one is a :class:`ConfigError` naming it), ``family``
    naming it."""
    arch = find_architecture(cfg, source)
    check_field_types(cfg, source)
    try:
        return {**arch.read_config(cfg, source), "family": arch.model_type}
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # values out of range
        raise ConfigError(f"{source}: cannot read the configuration ({e})") from None
