"""Llama (3.x; SmolLM2 is one): the shared decoder fields; ``attention_bias`` biases q/k/v/o."""

from __future__ import annotations

from edgelora.weights.families.base import Family, register


@register("LlamaForCausalLM")
class Llama(Family):
    label = "Llama"
    model_type = "llama"
