"""Hugging Face and torchtune tensor names -> ours, and HF's rotary row order -> Meta's.

Hugging Face stores each attention head's query/key rows permuted for its rotate-half rotary
convention: HF row ``j`` of a head is Meta row ``2j`` for ``j < head_dim/2`` and ``2(j - head_dim/2)
+ 1`` after. This model uses Meta's convention (rotate adjacent pairs), so HF ``q_proj``/``k_proj``
weights -- and the ``lora_B`` of adapters on them, whose rows are the same output features -- are
un-permuted at load time with :func:`hf_to_meta_rows` (and permuted back when written).
"""

from __future__ import annotations

import re

import torch

from edgelora.errors import ConfigError
from edgelora.weights.architectures import HF_PROJECTIONS, hf_projections

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

_HF_LAYER_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_layernorm": "attention.q_norm",
    "self_attn.kv_a_layernorm": "attention.kv_norm",
}


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
