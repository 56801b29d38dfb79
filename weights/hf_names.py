"""Hugging Face module names per family -> this model's (projections and layer norms)."""

from __future__ import annotations

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
# Phi-3's natively fused layers: they load as the fused blocks' layers (``checkpoint_fused``).
PHI3_PROJECTIONS = {
    "qkv_proj": ("self_attn", "attention.wqkv"),
    "o_proj": ("self_attn", "attention.wo"),
    "gate_up_proj": ("mlp", "feed_forward.w13"),
    "down_proj": ("mlp", "feed_forward.w2"),
}
# Every HF projection name the architectures use (PEFT's "all-linear" matches these).
ALL_PROJECTIONS = {**HF_PROJECTIONS, **DEEPSEEK_PROJECTIONS, **PHI3_PROJECTIONS}


def hf_projections(
    attention_type: str = "gqa", q_lora_rank: int = 0, *, fused: bool = False
) -> dict[str, tuple]:
    """HF projection name -> (HF parent module, our path in a block) for one architecture
    (``fused``: Phi-3's ``qkv_proj``/``gate_up_proj``)."""
    if attention_type != "mla":
        return PHI3_PROJECTIONS if fused else HF_PROJECTIONS
    skip = ("q_a_proj", "q_b_proj") if not q_lora_rank else ("q_proj",)
    return {k: v for k, v in DEEPSEEK_PROJECTIONS.items() if k not in skip}


# Layer-norm names -> ours (inside a TransformerBlock).
LLAMA_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
DEEPSEEK_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_layernorm": "attention.q_norm",
    "self_attn.kv_a_layernorm": "attention.kv_norm",
}
# Gemma 3 norms around both branches: its post_attention_layernorm is *after* attention.
GEMMA3_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
