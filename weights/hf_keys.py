"""Checkpoint key layouts: which one a state dict has (Hugging Face's or torchtune's), torchtune's
names -> ours, and the HF rotary row order of a model's tensors (its family's).

Each Hugging Face family maps its own tensors (:meth:`Family.map_tensor
<edgelora.weights.families.base.Family.map_tensor>`); torchtune keeps Meta's rotary layout and
Llama's modules, so its keys are only renamed here.
"""

from __future__ import annotations

import re

import torch

from edgelora.errors import ConfigError
from edgelora.weights.families import family_of
from edgelora.weights.families.base import LLAMA_PROJECTIONS

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


def rotary_rows(w: torch.Tensor, proj: str, args, *, to_meta: bool = True) -> torch.Tensor:
    """``w``'s rows (a weight, bias, norm weight or ``lora_B`` of ``proj``) in Meta's rotary
    order (``to_meta``) or back in HF's, as the family of ``args`` stores them."""
    return family_of(args).rotary_rows(w, proj, args, to_meta=to_meta)


_TT_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)\.weight$")
_TT_NORM_KEY = re.compile(r"^layers\.(\d+)\.(sa_norm|mlp_norm)\.scale$")


def is_hf_state_dict(keys) -> bool:
    return any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys)


def is_torchtune_state_dict(keys) -> bool:
    return any(_TT_KEY.match(k) or _TT_NORM_KEY.match(k) or k == "norm.scale" for k in keys)


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
            out[f"layers.{layer}.{LLAMA_PROJECTIONS[hf][1]}.weight"] = t
        elif m := _TT_NORM_KEY.match(key):
            out[f"layers.{m.group(1)}.{_TT_LAYER_NORMS[m.group(2)]}.weight"] = t
        else:
            raise ConfigError(f"{source}: key {key!r} is not part of a torchtune Llama checkpoint")
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].detach()  # tied (Llama 3.2): alias
    return out
