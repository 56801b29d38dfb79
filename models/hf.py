"""Hugging Face Llama layout: ``config.json`` -> ``ModelArgs``, and HF/torchtune key names -> ours.

Hugging Face stores each attention head's query/key rows permuted for its rotate-half rotary
convention: HF row ``j`` of a head is Meta row ``2j`` for ``j < head_dim/2`` and ``2(j - head_dim/2)
+ 1`` after. This model uses Meta's convention (rotate adjacent pairs), so HF ``q_proj``/``k_proj``
weights -- and the ``lora_B`` of adapters on them, whose rows are the same output features -- are
un-permuted at load time with :func:`hf_to_meta_rows` (and permuted back when written).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from edgelora.errors import ConfigError

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
# Every HF projection name either architecture uses (PEFT's "all-linear" matches these).
ALL_PROJECTIONS = {**HF_PROJECTIONS, **DEEPSEEK_PROJECTIONS}
# torchtune's projection names (its Llama builders) -> HF's.
TORCHTUNE_TO_HF = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}
_TORCHTUNE_PARENT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "output_proj": "attn"}

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
DEEPSEEK_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
_HF_LAYER_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_layernorm": "attention.q_norm",
    "self_attn.kv_a_layernorm": "attention.kv_norm",
}


def hf_projections(attention_type: str = "gqa", q_lora_rank: int = 0) -> dict[str, tuple]:
    """HF projection name -> (HF parent module, our path in a block) for one architecture."""
    if attention_type != "mla":
        return HF_PROJECTIONS
    skip = ("q_a_proj", "q_b_proj") if not q_lora_rank else ("q_proj",)
    return {k: v for k, v in DEEPSEEK_PROJECTIONS.items() if k not in skip}


_TT_LAYER_NORMS = {"sa_norm": "attention_norm", "mlp_norm": "ffn_norm"}


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's per-head rotary permutation of the rows of ``w`` (``[n_heads*head_dim, ...]``)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ConfigError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`hf_to_meta_rows` (Meta's interleaved rows -> HF's rotate-half rows)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ConfigError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(proj: str, n_heads: int, n_kv_heads: int, *, mla: bool = False) -> int | None:
    """Heads to un-permute for an HF Llama projection (q: n_heads, k: n_kv_heads), else None.

    DeepSeek (``rope_interleave``) keeps adjacent rotary pairs, our layout: nothing to permute.
    """
    return None if mla else {"q_proj": n_heads, "k_proj": n_kv_heads}.get(proj)


def _rope_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x writes rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type in ("default", None):
        return out
    if rope_type == "llama3":
        out.update(
            use_scaled_rope=True,
            rope_scale_factor=float(merged.get("factor", 8.0)),
            rope_low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            rope_original_max_seq_len=int(merged.get("original_max_position_embeddings", 8192)),
        )
        return out
    raise ConfigError(
        f"{source}: rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
    )


def args_from_hf_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """``ModelArgs`` fields from a Hugging Face Llama ``config.json``.

    Raises :class:`ConfigError` for architectures other than Llama and for Llama options this
    model does not implement (biases, another activation, a head_dim that is not dim/heads).
    """
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if set(archs) & set(DEEPSEEK_ARCHITECTURES) or (not archs and model_type == "deepseek_v3"):
        return _args_from_deepseek_config(cfg, source)
    if archs and not set(archs) & set(LLAMA_ARCHITECTURES):
        raise ConfigError(
            f"{source}: architecture {', '.join(map(str, archs))} is not supported "
            f"(supported: {', '.join(LLAMA_ARCHITECTURES + DEEPSEEK_ARCHITECTURES)})"
        )
    if not archs and model_type != "llama":
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported (need 'llama' or 'deepseek_v3')"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (Llama without biases only)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(dim, int) and isinstance(heads, int) and heads:
        if head_dim * heads != dim:
            raise ConfigError(
                f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {dim}"
                " is not supported"
            )
    fields = {
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg["vocab_size"],
        "hidden_dim": cfg.get("intermediate_size"),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        **_rope_fields(cfg, source),
    }
    if cfg.get("max_position_embeddings"):
        fields["max_seq_len"] = int(cfg["max_position_embeddings"])
    return fields


def _args_from_deepseek_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
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
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
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
    rope = _rope_fields(cfg, source)
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


_HF_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_HF_NORM_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|"
    r"self_attn\.q_a_layernorm|self_attn\.kv_a_layernorm)\.weight$"
)
_TT_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.weight$")
_TT_NORM_KEY = re.compile(r"^layers\.(\d+)\.(sa_norm|mlp_norm)\.scale$")


def is_hf_state_dict(keys) -> bool:
    return any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys)


def is_torchtune_state_dict(keys) -> bool:
    return any(_TT_KEY.match(k) or _TT_NORM_KEY.match(k) or k == "norm.scale" for k in keys)


def hf_state_dict_to_ours(
    sd: dict[str, torch.Tensor],
    *,
    n_heads: int,
    n_kv_heads: int,
    source: str,
    attention_type: str = "gqa",
    q_lora_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """Rename HF Llama (or DeepSeek-V3) keys to ours and un-permute Llama's q/k rows; ties
    ``output`` to the embedding when the checkpoint has no ``lm_head.weight``."""
    mla = attention_type == "mla"
    projections = hf_projections(attention_type, q_lora_rank)
    arch = "DeepSeek-V3 (dense)" if mla else "Llama"
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some old checkpoints carry
        if key == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif key == "model.norm.weight":
            out["norm.weight"] = t
        elif key == "lm_head.weight":
            out["output.weight"] = t
        elif (m := _HF_NORM_KEY.match(key)) and (mla or "self_attn" not in m.group(2)):
            out[f"layers.{m.group(1)}.{_HF_LAYER_NORMS[m.group(2)]}.weight"] = t
        elif m := _HF_KEY.match(key):
            layer, parent, proj = m.groups()
            if proj not in projections or projections[proj][0] != parent:
                raise ConfigError(f"{source}: key {key!r} is not a {arch} projection")
            heads = rope_heads(proj, n_heads, n_kv_heads, mla=mla)
            if heads is not None:
                t = hf_to_meta_rows(t, heads)
            out[f"layers.{layer}.{projections[proj][1]}.weight"] = t
        else:
            raise ConfigError(f"{source}: key {key!r} is not part of a {arch} checkpoint")
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def torchtune_state_dict_to_ours(
    sd: dict[str, torch.Tensor], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename torchtune Llama keys (``layers.N.attn.q_proj.weight``, ``sa_norm.scale``, ...) to
    ours. torchtune keeps Meta's rotary layout, so nothing is permuted."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in ("tok_embeddings.weight", "output.weight"):
            out[key] = t
        elif key == "norm.scale":
            out["norm.weight"] = t
        elif m := _TT_KEY.match(key):
            layer, parent, proj = m.groups()
            hf = TORCHTUNE_TO_HF.get(proj)
            if hf is None or _TORCHTUNE_PARENT.get(proj, "mlp") != parent:
                raise ConfigError(f"{source}: key {key!r} is not a Llama projection")
            out[f"layers.{layer}.{HF_PROJECTIONS[hf][1]}.weight"] = t
        elif m := _TT_NORM_KEY.match(key):
            out[f"layers.{m.group(1)}.{_TT_LAYER_NORMS[m.group(2)]}.weight"] = t
        else:
            raise ConfigError(f"{source}: key {key!r} is not part of a torchtune Llama checkpoint")
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()  # tied (Llama 3.2)
    return out
