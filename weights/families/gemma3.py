"""Gemma 3 (text): (1 + w) norms around both branches, q/k norms, GELU-tanh, embeddings scaled
by sqrt(hidden_size), ``query_pre_attn_scalar``, sliding layers with their own rotary base,
soft-capping when set."""

from __future__ import annotations

from typing import Any

from edgelora.errors import ConfigError
from edgelora.weights.families.base import Family, decoder_fields, refuse, register


@register("Gemma3ForCausalLM")
class Gemma3(Family):
    label = "Gemma 3"
    model_type = "gemma3_text"
    # norms around both branches: its post_attention_layernorm is *after* attention
    norms = {
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffn_norm",
        "self_attn.q_norm": "attention.q_norm",
        "self_attn.k_norm": "attention.k_norm",
    }

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        rope = cfg.get("rope_parameters") or {}
        full = rope.get("full_attention") if isinstance(rope.get("full_attention"), dict) else None
        fields = decoder_fields(
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
        refuse(cfg, source, attn_logit_softcapping="transformers' Gemma 3 does not apply it")
        return fields
