"""Hugging Face and torchtune tensor names -> ours, and HF's rotary row order -> Meta's.

Hugging Face stores each attention head's query/key rows permuted for its rotate-half rotary
convention: HF row ``j`` of a head is Meta row ``2j`` for ``j < head_dim/2`` and ``2(j - head_dim/2)
+ 1`` after. This model uses Meta's convention (rotate adjacent pairs), so HF ``q_proj``/``k_proj``
weights -- and the ``lora_B`` of adapters on them, whose rows are the same output features -- are
un-permuted at load time with :func:`rotary_rows` (and permuted back when written) -- and so
are q/k biases and q/k norm weights; only the rotary part of a head with partial rotary.
"""

from __future__ import annotations

import re

import torch

from edgelora.errors import ConfigError
from edgelora.weights.hf_names import HF_PROJECTIONS, hf_projections

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


_TT_LAYER_NORMS = {"sa_norm": "attention_norm", "mlp_norm": "ffn_norm"}


def _permute_rows(
    w: torch.Tensor, blocks: list[tuple[int, int]], head_dim: int, rot: int, *, to_meta: bool
) -> torch.Tensor:
    """``w`` with the rotary rows of every head of each ``(row offset, heads)`` block permuted
    between HF's rotate-half order and Meta's adjacent pairs (the other rows unchanged)."""
    if rot % 2 or rot > head_dim:
        raise ConfigError(f"cannot permute {rot} rotary rows of {head_dim}-row heads")
    pieces, row, rest = [], 0, w.shape[1:]
    for offset, heads in blocks:
        end = offset + heads * head_dim
        if end > w.shape[0]:
            raise ConfigError(
                f"cannot split rows {offset}..{end} of a {w.shape[0]}-row tensor into {heads} "
                f"heads of {head_dim}"
            )
        pieces.append(w[row:offset])
        part = w[offset:end].reshape(heads, head_dim, *rest)
        halves = (2, rot // 2) if to_meta else (rot // 2, 2)
        r = part[:, :rot].reshape(heads, *halves, *rest).transpose(1, 2)
        pieces.append(torch.cat([r.reshape(heads, rot, *rest), part[:, rot:]], 1).flatten(0, 1))
        row = end
    pieces.append(w[row:])
    return torch.cat(pieces)


def rope_blocks(proj: str, args) -> list[tuple[int, int]]:
    """The ``(row offset, heads)`` blocks of HF projection ``proj`` (or q/k norm) whose rows are
    in HF's rotary order: q's heads, k's heads, both inside Phi-3's ``qkv_proj``; none for MLA
    (DeepSeek keeps adjacent rotary pairs, our layout)."""
    if args.is_mla:
        return []
    q_rows = args.n_heads * args.head_dim
    return {
        "q_proj": [(0, args.n_heads)],
        "k_proj": [(0, args.kv_heads)],
        "qkv_proj": [(0, args.n_heads), (q_rows, args.kv_heads)],
        "q_norm": [(0, 1)],
        "k_norm": [(0, 1)],
    }.get(proj, [])


def rotary_rows(w: torch.Tensor, proj: str, args, *, to_meta: bool = True) -> torch.Tensor:
    """``w``'s rows (a weight, bias, norm weight or ``lora_B`` of ``proj``) in Meta's rotary
    order (``to_meta``) or back in HF's."""
    blocks = rope_blocks(proj, args)
    if not blocks:
        return w
    return _permute_rows(w, blocks, args.head_dim, args.rope_dim, to_meta=to_meta)


_HF_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_HF_NORM_KEY = re.compile(
    r"^model\.layers\.(\d+)\.((?:self_attn\.)?\w*(?:norm|layernorm))\.weight$"
)
_TT_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.weight$")
_TT_NORM_KEY = re.compile(r"^layers\.(\d+)\.(sa_norm|mlp_norm)\.scale$")


def is_hf_state_dict(keys) -> bool:
    return any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys)


def is_torchtune_state_dict(keys) -> bool:
    return any(_TT_KEY.match(k) or _TT_NORM_KEY.match(k) or k == "norm.scale" for k in keys)


def hf_state_dict_to_ours(
    sd: dict[str, torch.Tensor], args, *, norms: dict[str, str], source: str, label: str
) -> dict[str, torch.Tensor]:
    """Rename HF keys of a model of ``args`` to ours (``norms``: the family's layer-norm names
    -> ours) and put q/k rows (weights, biases, q/k norms) in Meta's rotary order; ties
    ``output`` to the embedding when the checkpoint has no ``lm_head.weight``."""
    projections = hf_projections(
        args.attention_type, args.q_lora_rank, fused=args.hf_fused_projections
    )
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
        elif (m := _HF_NORM_KEY.match(key)) and m.group(2) in norms:
            name = m.group(2).rsplit(".", 1)[-1]
            out[f"layers.{m.group(1)}.{norms[m.group(2)]}.weight"] = rotary_rows(t, name, args)
        elif m := _HF_KEY.match(key):
            layer, parent, proj, kind = m.groups()
            if proj not in projections or projections[proj][0] != parent:
                raise ConfigError(f"{source}: key {key!r} is not a {label} projection")
            out[f"layers.{layer}.{projections[proj][1]}.{kind}"] = rotary_rows(t, proj, args)
        else:
            raise ConfigError(f"{source}: key {key!r} is not part of a {label} checkpoint")
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].detach()  # an alias, no copy
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
        out["output.weight"] = out["tok_embeddings.weight"].detach()  # tied (Llama 3.2): alias
    return out
