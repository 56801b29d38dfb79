"""Hugging Face architectures: ``config.json`` -> ``ModelArgs`` fields, and projection names.

One :class:`Architecture` per family, registered in :data:`ARCHITECTURES` by the
``architectures`` names (and ``model_type``) its ``config.json`` carries: a function reading the
hyper-parameters (every field that changes the math is honoured or refused by name) and the
table of its projection names. Adding a family is one entry here plus, if its tensor names
differ, its rows in :mod:`edgelora.weights.hf_keys`. An unknown architecture is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgelora.errors import ConfigError
from edgelora.weights.hf_names import DEEPSEEK_NORMS, GEMMA3_NORMS, LLAMA_NORMS

# The types of the config.json fields the readers below use (null is always allowed: "unset").
# Checked before any reader runs, so a field of the wrong type is one line naming it.
_INT, _NUM, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
_FIELD_TYPES = {
    **dict.fromkeys(
        (
            "hidden_size num_hidden_layers num_attention_heads num_key_value_heads vocab_size "
            "intermediate_size head_dim max_position_embeddings sliding_window "
            "sliding_window_pattern max_window_layers kv_lora_rank qk_rope_head_dim "
            "qk_nope_head_dim v_head_dim q_lora_rank first_k_dense_replace pretraining_tp "
            "original_max_position_embeddings"
        ).split(),
        _INT,
    ),
    **dict.fromkeys(
        (
            "rms_norm_eps rope_theta partial_rotary_factor rope_local_base_freq factor "
            "low_freq_factor high_freq_factor embedding_multiplier residual_multiplier "
            "attention_multiplier logits_scaling final_logit_softcapping query_pre_attn_scalar"
        ).split(),
        _NUM,
    ),
    **dict.fromkeys("attention_bias mlp_bias use_sliding_window rope_interleave".split(), _BOOL),
    **dict.fromkeys("hidden_act hidden_activation model_type rope_type type".split(), _STR),
}
_NESTED = ("rope_parameters", "rope_scaling")  # objects holding more of the fields above


def _is(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool if kind == _BOOL else str)


def check_field_types(cfg: dict[str, Any], source: str, where: str = "") -> None:
    """:class:`ConfigError` naming the first field whose value has the wrong JSON type."""
    for key, value in cfg.items():
        name = f"{where}{key}"
        if value is None:
            continue
        kind = _FIELD_TYPES.get(key)
        if kind is not None and not _is(value, kind):
            raise ConfigError(f"{source}: {name} must be {kind}, got {value!r:.80}")
        if key in _NESTED or (where and isinstance(value, dict)):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a JSON object, got {value!r:.80}")
            if name.count(".") < 2:  # Gemma 3 nests one level: {"full_attention": {...}}
                check_field_types(value, source, f"{name}.")
        if key == "layer_types" and not (
            isinstance(value, list) and all(isinstance(t, str) for t in value)
        ):
            raise ConfigError(f"{source}: layer_types must be a list of strings, got {value!r:.80}")
        if key == "no_rope_layers" and not (
            isinstance(value, list) and all(_is(v, _INT) or isinstance(v, bool) for v in value)
        ):
            raise ConfigError(
                f"{source}: no_rope_layers must be a list of 0/1 flags, got {value!r:.80}"
            )


def _rope_fields(cfg: dict[str, Any], source: str, params: dict | None = None) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x writes rope_theta + rope_scaling.
    params = (cfg.get("rope_parameters") or {}) if params is None else params
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        out["partial_rotary_factor"] = float(partial)
    if rope_type in ("default", None):
        return out
    if rope_type == "linear":
        out["rope_linear_factor"] = float(merged.get("factor", 1.0))
        return out
    if rope_type == "llama3":
        out.update(
            use_scaled_rope=True,
            rope_scale_factor=float(merged.get("factor", 8.0)),
            rope_low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            rope_original_max_seq_len=int(merged.get("original_max_position_embeddings", 8192)),
        )
        return out
    raise ConfigError(
        f"{source}: rope scaling type {rope_type!r} is not supported (supported: default, "
        "linear, llama3)"
    )


def _require(cfg: dict[str, Any], source: str, *keys: str) -> None:
    for key in keys:
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")


def _refuse(cfg: dict[str, Any], source: str, **why: str) -> None:
    """Fields this family's reader does not implement: an error naming them when set."""
    for key, reason in why.items():
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported ({reason})")


def _layer_types(cfg: dict[str, Any], source: str, n_layers: int) -> dict[str, Any]:
    """``layer_types``/``sliding_window``: transformers 5 lists each layer's attention;
    older configs give a ``sliding_window`` (Mistral, Phi-3: every layer) or
    ``use_sliding_window`` + ``max_window_layers`` (Qwen2: layers from that index on)."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        unknown = sorted({t for t in types if t not in names})
        if unknown or len(types) != n_layers:
            raise ConfigError(
                f"{source}: layer_types must list {n_layers} of {sorted(names)}, got {types}"
            )
        types = [names[t] for t in types]
        if cfg.get("use_sliding_window") is False:
            types = ["full"] * n_layers  # Qwen2/3, SmolLM3 list the types but switch them off
    elif cfg.get("sliding_window_pattern"):  # Gemma 3 before layer_types: every Nth is full
        n = cfg["sliding_window_pattern"]
        types = ["full" if (i + 1) % n == 0 else "sliding" for i in range(n_layers)]
    elif cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", 0)
        types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    elif window and cfg.get("use_sliding_window") is None:
        types = ["sliding"] * n_layers
    if not types or "sliding" not in types:
        return {}
    if not isinstance(window, int) or window <= 0:
        raise ConfigError(
            f"{source}: sliding layers need a positive sliding_window, got {window!r}"
        )
    return {"layer_types": tuple(types), "sliding_window": window}


def _decoder_fields(cfg: dict[str, Any], source: str, *, act_key: str = "hidden_act") -> dict:
    """The fields every Llama-like family shares, honoured (or refused) by name."""
    _require(cfg, source, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    act = cfg.get(act_key, "silu")
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if act not in acts:
        raise ConfigError(
            f"{source}: {act_key} {act!r} is not supported (silu or gelu_pytorch_tanh, gated)"
        )
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    dim, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    fields = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg["vocab_size"],
        "hidden_dim": cfg.get("intermediate_size"),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "hidden_act": acts[act],
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "attention_out_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        **_rope_fields(cfg, source),
        **_layer_types(cfg, source, layers),
    }
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(dim, int) and isinstance(heads, int) and heads:
        if head_dim * heads != dim:
            fields["head_dim_override"] = int(head_dim)
    if cfg.get("max_position_embeddings"):
        fields["max_seq_len"] = int(cfg["max_position_embeddings"])
    return fields


def _llama_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Llama (3.x; SmolLM2 is one): the shared fields (attention_bias biases q/k/v/o)."""
    return _decoder_fields(cfg, source)


def _mistral_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Mistral: a Llama whose ``sliding_window``, when set, applies to every layer."""
    return _decoder_fields(cfg, source)


def _qwen2_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen2/2.5: q/k/v always have a bias, the output projection none."""
    return {**_decoder_fields(cfg, source), "attention_bias": True, "attention_out_bias": False}


def _qwen3_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen3: an explicit head_dim and RMSNorm on each q/k head before rotary."""
    return {**_decoder_fields(cfg, source), "qk_norm": True}


def _smollm3_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """SmolLM3: ``no_rope_layers[i]`` is 0 for a layer without rotary embeddings."""
    fields = _decoder_fields(cfg, source)
    flags = cfg.get("no_rope_layers")
    if flags is not None:
        if len(flags) != fields["n_layers"]:
            raise ConfigError(
                f"{source}: no_rope_layers has {len(flags)} entries for {fields['n_layers']} layers"
            )
        fields["nope_layers"] = tuple(i for i, use in enumerate(flags) if not use)
    return fields


def _granite_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Granite: multipliers on the embedding, residual branches and scores; logits divided."""
    return {
        **_decoder_fields(cfg, source),
        "embedding_scale": float(cfg.get("embedding_multiplier", 1.0)),
        "residual_scale": float(cfg.get("residual_multiplier", 1.0)),
        "attention_scale": float(cfg.get("attention_multiplier", 1.0)),
        "logits_scaling": float(cfg.get("logits_scaling", 1.0)),
    }


def _phi3_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini)."""
    return {**_decoder_fields(cfg, source), "hf_fused_projections": True}


def _gemma3_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma 3 (text): (1 + w) norms around both branches, q/k norms, GELU-tanh, embeddings
    scaled by sqrt(hidden_size), query_pre_attn_scalar, sliding layers with their own rotary
    base, soft-capping when set."""
    rope = cfg.get("rope_parameters") or {}
    full = rope.get("full_attention") if isinstance(rope.get("full_attention"), dict) else None
    fields = _decoder_fields(
        {**cfg, "rope_parameters": full or rope}, source, act_key="hidden_activation"
    )
    local = rope.get("sliding_attention") if isinstance(rope, dict) else None
    if isinstance(local, dict):
        if local.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is "
                "not supported (default only)"
            )
        fields["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
    elif cfg.get("rope_local_base_freq"):
        fields["rope_local_theta"] = float(cfg["rope_local_base_freq"])
    scalar = cfg.get("query_pre_attn_scalar") or fields.get("head_dim_override")
    scalar = scalar or cfg["hidden_size"] // cfg["num_attention_heads"]
    fields.update(
        qk_norm=True,
        norm_offset=1.0,
        sandwich_norms=True,
        embedding_scale=float(cfg["hidden_size"]) ** 0.5,
        attention_scale=float(scalar) ** -0.5,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
    )
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it (Gemma 3 caps
    # with q/k norms; the released configs set it null): applying it would diverge from the
    # reference, ignoring it would ignore a field.
    _refuse(cfg, source, attn_logit_softcapping="transformers' Gemma 3 does not apply it")
    return fields


def _deepseek_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``ModelArgs`` fields from a DeepSeek-V3 ``config.json`` whose layers are all dense."""
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "intermediate_size",
    ):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r} (DeepSeek-V3 config)")
    layers = cfg["num_hidden_layers"]
    dense = cfg.get("first_k_dense_replace", 3)  # transformers' default
    if isinstance(dense, int) and isinstance(layers, int) and dense < layers:
        raise ConfigError(
            f"{source}: first_k_dense_replace={dense} < num_hidden_layers={layers}: layers "
            f"{dense}..{layers - 1} are mixture-of-experts (n_routed_experts="
            f"{cfg.get('n_routed_experts')}), which is not supported yet; only dense DeepSeek "
            "layers (first_k_dense_replace >= num_hidden_layers) can be exported"
        )
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if cfg.get("rope_interleave", True) is False:
        raise ConfigError(
            f"{source}: rope_interleave=false is not supported (DeepSeek checkpoints use "
            "interleaved rotary pairs, the default)"
        )
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads not in (None, cfg["num_attention_heads"]):
        raise ConfigError(
            f"{source}: num_key_value_heads={kv_heads} != num_attention_heads="
            f"{cfg['num_attention_heads']} is not supported for MLA"
        )
    rope = _rope_fields(cfg, source)
    if rope.get("use_scaled_rope"):
        raise ConfigError(
            f"{source}: rope scaling is not supported for DeepSeek/MLA models (yarn mscale is "
            "not implemented); remove rope_scaling / rope_parameters' scaling"
        )
    fields = {
        "dim": cfg["hidden_size"],
        "n_layers": layers,
        "n_heads": cfg["num_attention_heads"],
        "vocab_size": cfg["vocab_size"],
        "hidden_dim": cfg["intermediate_size"],
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "attention_type": "mla",
        "q_lora_rank": cfg.get("q_lora_rank") or 0,
        "kv_lora_rank": cfg["kv_lora_rank"],
        "qk_nope_head_dim": cfg["qk_nope_head_dim"],
        "qk_rope_head_dim": cfg["qk_rope_head_dim"],
        "v_head_dim": cfg["v_head_dim"],
        **rope,
    }
    if cfg.get("max_position_embeddings"):
        fields["max_seq_len"] = int(cfg["max_position_embeddings"])
    return fields


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face model family edgelora reads."""

    label: str  # for messages
    hf_names: tuple[str, ...]  # config.json "architectures" entries
    model_type: str
    read_config: Callable[[dict[str, Any], str], dict[str, Any]]  # -> ModelArgs fields
    norms: dict[str, str] = field(default_factory=lambda: dict(LLAMA_NORMS))  # HF -> ours


ARCHITECTURES = (
    Architecture("Llama", ("LlamaForCausalLM",), "llama", _llama_fields),
    Architecture("Mistral", ("MistralForCausalLM",), "mistral", _mistral_fields),
    Architecture("Qwen2", ("Qwen2ForCausalLM",), "qwen2", _qwen2_fields),
    Architecture("Qwen3", ("Qwen3ForCausalLM",), "qwen3", _qwen3_fields),
    Architecture("SmolLM3", ("SmolLM3ForCausalLM",), "smollm3", _smollm3_fields),
    Architecture("Granite", ("GraniteForCausalLM",), "granite", _granite_fields),
    Architecture("Phi-3", ("Phi3ForCausalLM",), "phi3", _phi3_fields),
    Architecture(
        "Gemma 3", ("Gemma3ForCausalLM",), "gemma3_text", _gemma3_fields, norms=GEMMA3_NORMS
    ),
    Architecture(
        "DeepSeek-V3 (dense)",
        ("DeepseekV3ForCausalLM",),
        "deepseek_v3",
        _deepseek_fields,
        norms=DEEPSEEK_NORMS,
    ),
)
# Architectures refused with a reason (rather than "not supported").
_REFUSED = {
    "Gemma3ForConditionalGeneration": "a vision-language checkpoint; export its text model "
    "(Gemma3ForCausalLM) instead",
    "Qwen3MoeForCausalLM": "mixture-of-experts layers are not supported",
    "Qwen2MoeForCausalLM": "mixture-of-experts layers are not supported",
    "MixtralForCausalLM": "mixture-of-experts layers are not supported",
    "PhiMoEForCausalLM": "mixture-of-experts layers are not supported",
}


def find_architecture(cfg: dict[str, Any], source: str) -> Architecture:
    """The registered architecture of a ``config.json`` (by ``architectures``, else
    ``model_type``); :class:`ConfigError` naming it and the supported ones otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{source}: 'architectures' must be a list of names, got {archs!r:.80}")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{source}: 'model_type' must be a string, got {model_type!r:.80}")
    for arch in ARCHITECTURES:
        if set(archs) & set(arch.hf_names) or (not archs and model_type == arch.model_type):
            return arch
    supported = ", ".join(n for a in ARCHITECTURES for n in a.hf_names)
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
        f"{', '.join(repr(a.model_type) for a in ARCHITECTURES)})"
    )


def args_from_hf_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``ModelArgs`` fields from a Hugging Face ``config.json`` of a registered architecture
    (field types checked first: a wrong one is a :class:`ConfigError` naming it)."""
    arch = find_architecture(cfg, source)
    check_field_types(cfg, source)
    try:
        return arch.read_config(cfg, source)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # values out of range
        raise ConfigError(f"{source}: cannot read the configuration ({e})") from None
