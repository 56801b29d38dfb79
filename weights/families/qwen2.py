"""Qwen2/2.5: q/k/v always have a bias, the output projection none."""

from __future__ import annotations

from typing import Any

from edgelora.weights.families.base import Family, decoder_fields, register


@register("Qwen2ForCausalLM")
class Qwen2(Family):
    label = "Qwen2"
    model_type = "qwen2"

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return {**decoder_fields(cfg, source), "attention_bias": True, "attention_out_bias": False}
