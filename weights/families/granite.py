"""Granite: multipliers on the embedding, residual branches and scores; logits divided."""

from __future__ import annotations

from typing import Any

from edgelora.weights.families.base import Family, decoder_fields, register


@register("GraniteForCausalLM")
class Granite(Family):
    label = "Granite"
    model_type = "granite"

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return {
            **decoder_fields(cfg, source),
            "embedding_scale": float(cfg.get("embedding_multiplier", 1.0)),
            "residual_scale": float(cfg.get("residual_multiplier", 1.0)),
            "attention_scale": float(cfg.get("attention_multiplier", 1.0)),
            "logits_scaling": float(cfg.get("logits_scaling", 1.0)),
        }
