"""Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini)."""

from __future__ import annotations

from typing import Any

from edgelora.weights.families.base import Family, decoder_fields, register


@register("Phi3ForCausalLM")
class Phi3(Family):
    label = "Phi-3"
    model_type = "phi3"

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return {**decoder_fields(cfg, source), "hf_fused_projections": True}
