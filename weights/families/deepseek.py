"""DeepSeek-V3 with dense layers only: multi-head latent attention (MLA)."""

from __future__ import annotations

from typing import Any

from edgelora.errors import ConfigError
from edgelora.weights.families.base import Family, register, rope_fields


@register("DeepseekV3ForCausalLM")
class DeepseekV3(Family):
    label = "DeepSeek-V3 (dense)"
    model_type = "deepseek_v3"
    # ``q_proj`` when the config has no query latent (``q_lora_rank`` null), else
    # ``q_a_proj``/``q_b_proj`` (:meth:`layer_projections`)
    projections = {
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
    norms = {
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_a_layernorm": "attention.q_norm",
        "self_attn.kv_a_layernorm": "attention.kv_norm",
    }

    @classmethod
    def layer_projections(cls, args) -> dict[str, tuple[str, str]]:
        skip = ("q_a_proj", "q_b_proj") if not args.q_lora_rank else ("q_proj",)
        return {k: v for k, v in cls.projections.items() if k not in skip}

    @classmethod
    def rope_blocks(cls, name: str, args) -> list[tuple[int, int]]:
        return []  # DeepSeek keeps adjacent rotary pairs: our layout

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
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
            raise ConfigError(
                f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)"
            )
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
        rope = rope_fields(cfg, source)
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
