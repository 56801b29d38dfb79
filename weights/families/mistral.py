"""Mistral: a Llama whose ``sliding_window``, when set, applies to every layer."""

from __future__ import annotations

from edgelora.weights.families.base import Family, register


@register("MistralForCausalLM")
class Mistral(Family):
    label = "Mistral"
    model_type = "mistral"
