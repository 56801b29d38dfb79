"""Qwen3: an explicit head_dim and RMSNorm on each q/k head before rotary."""

from __future__ import annotations

from typing import Any

from edgelora.weights.families.base import Family, decoder_fields, register


@register("Qwen3ForCausalLM")
class Qwen3(Family):
    label = "Qwen3"
    model_type = "qwen3"

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return {**decoder_fields(cfg, source), "qk_norm": True}
