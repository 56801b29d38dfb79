"""Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (Phi-4-mini).

The fused layers load as the fused blocks' layers (``checkpoint_fused``), so their names map
onto ``wqkv``/``w13`` and the rotary rows of both q's and k's heads are inside ``qkv_proj``."""

from __future__ import annotations

from edgelora.weights.families.base import Family, register


@register("Phi3ForCausalLM")
class Phi3(Family):
    label = "Phi-3"
    model_type = "phi3"
    projections = {
        "qkv_proj": ("self_attn", "attention.wqkv"),
        "o_proj": ("self_attn", "attention.wo"),
        "gate_up_proj": ("mlp", "feed_forward.w13"),
        "down_proj": ("mlp", "feed_forward.w2"),
    }

    @classmethod
    def rope_blocks(cls, name: str, args) -> list[tuple[int, int]]:
        if name == "qkv_proj":
            return [(0, args.n_heads), (args.n_heads * args.head_dim, args.kv_heads)]
        return super().rope_blocks(name, args)
