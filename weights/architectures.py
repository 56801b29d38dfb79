"""Hugging Face architectures: ``config.json`` -> ``ModelArgs`` fields, and projection names.

One :class:`Architecture` per family, registered in :data:`ARCHITECTURES` by the
``architectures`` names (and ``model_type``) its ``config.json`` carries: a function reading the
hyper-parameters (every field that changes the math is honoured or refused by name) and the
table of its projection names. Adding a family is one entry here plus, if its tensor names
differ, its rows in :mod:`edgelora.weights.hf_keys`. An unknown architecture is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgelora.errors import ConfigError

# HF projection name -> (HF parent module, our module path inside a TransformerBlock).
HF_PROJECTIONS = {
    "q_proj": ("self_attn", "attention.wq"),
    "k_proj": ("self_attn", "attention.wk"),
    "v_proj": ("self_attn", "attention.wv"),
    "o_proj": ("self_attn", "attention.wo"),
    "gate_proj": ("mlp", "feed_forward.w1"),
    "up_proj": ("mlp", "feed_forward.w3"),
    "down_proj": ("mlp", "feed_forward.w2"),
}
# DeepSeek-V3 (MLA attention, dense MLP) projection names -> ours. ``q_proj`` is used when the
# config has no query latent (``q_lora_rank`` null), ``q_a_proj``/``q_b_proj`` otherwise.
DEEPSEEK_PROJECTIONS = {
    "q_proj": ("self_attn", "attention.wq"),
    "q_a_proj": ("self_attn", "attention.wq_a"),
    "q_b_proj": ("self_attn", "attention.wq_b"),
    "kv_a_proj_with_mqa": ("self_attn", "attention.wkv_a"),
    "kv_b_proj": ("self_attn", "attention.wkv_b"),
    "o_proj": ("self_attn", "attention.wo"),
    "gate_proj": ("mlp", "feed_forward.w1"),
    "up_proj": ("mlp", "feed_forward.w3"),
    "down_proj": ("mlp", "feed_forward.w2"),
}
# Every HF projection name either architecture uses (PEFT's "all-linear" matches these).
ALL_PROJECTIONS = {**HF_PROJECTIONS, **DEEPSEEK_PROJECTIONS}


def hf_projections(attention_type: str = "gqa", q_lora_rank: int = 0) -> dict[str, tuple]:
    """HF projection name -> (HF parent module, our path in a block) for one architecture."""
    if attention_type != "mla":
        return HF_PROJECTIONS
    skip = ("q_a_proj", "q_b_proj") if not q_lora_rank else ("q_proj",)
    return {k: v for k, v in DEEPSEEK_PROJECTIONS.items() if k not in skip}


def _rope_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x writes rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type in ("default", None):
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
        f"{source}: rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
    )


def _llama_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``ModelArgs`` fields from a Hugging Face Llama ``config.json``; Llama options this model
    does not implement (biases, another activation, a head_dim that is not dim/heads) are
    :class:`ConfigError` naming the field."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (Llama without biases only)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(dim, int) and isinstance(heads, int) and heads:
        if head_dim * heads != dim:
            raise ConfigError(
                f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {dim}"
                " is not supported"
            )
    fields = {
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg["vocab_size"],
        "hidden_dim": cfg.get("intermediate_size"),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        **_rope_fields(cfg, source),
    }
    if cfg.get("max_position_embeddings"):
        fields["max_seq_len"] = int(cfg["max_position_embeddings"])
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


ARCHITECTURES = (
    Architecture("Llama", ("LlamaForCausalLM",), "llama", _llama_fields),
    Architecture(
        "DeepSeek-V3 (dense)", ("DeepseekV3ForCausalLM",), "deepseek_v3", _deepseek_fields
    ),
)


def find_architecture(cfg: dict[str, Any], source: str) -> Architecture:
    """The registered architecture of a ``config.json`` (by ``architectures``, else
    ``model_type``); :class:`ConfigError` naming it and the supported ones otherwise."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    for arch in ARCHITECTURES:
        if set(archs) & set(arch.hf_names) or (not archs and model_type == arch.model_type):
            return arch
    supported = ", ".join(n for a in ARCHITECTURES for n in a.hf_names)
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
    """``ModelArgs`` fields from a Hugging Face ``config.json`` of a registered architecture."""
    return find_architecture(cfg, source).read_config(cfg, source)
