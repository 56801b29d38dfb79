"""What every family shares: the :class:`Family` base and its registry (a family's config
reader, per-tensor mapping, projection and layer-norm names, rotary row order), the JSON types
of the ``config.json`` fields the readers use (checked first), and the readers of the fields
every Llama-like family has (rope, sliding layers, the decoder's sizes).

Hugging Face stores each attention head's query/key rows permuted for its rotate-half rotary
convention: HF row ``j`` of a head is Meta row ``2j`` for ``j < head_dim/2`` and ``2(j -
head_dim/2) + 1`` after. This model uses Meta's convention (rotate adjacent pairs), so HF
``q_proj``/``k_proj`` weights -- and the ``lora_B`` of adapters on them, whose rows are the same
output features -- are un-permuted at load time with :meth:`Family.rotary_rows` (and permuted
back when written); so are q/k biases and q/k norm weights; only the rotary part of a head with
partial rotary.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch

from edgelora.errors import ConfigError

REGISTRY: dict[str, type[Family]] = {}  # "architectures" name -> its family, in registration order

# HF projection name -> (HF parent module, our module path inside a TransformerBlock).
LLAMA_PROJECTIONS = {
    "q_proj": ("self_attn", "attention.wq"),
    "k_proj": ("self_attn", "attention.wk"),
    "v_proj": ("self_attn", "attention.wv"),
    "o_proj": ("self_attn", "attention.wo"),
    "gate_proj": ("mlp", "feed_forward.w1"),
    "up_proj": ("mlp", "feed_forward.w3"),
    "down_proj": ("mlp", "feed_forward.w2"),
}
# HF layer-norm name -> ours (inside a TransformerBlock).
LLAMA_NORMS = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_HF_NORM_KEY = re.compile(
    r"^model\.layers\.(\d+)\.((?:self_attn\.)?\w*(?:norm|layernorm))\.weight$"
)


class Family:
    """A Hugging Face model family: the ``architectures`` names it takes (given to
    :func:`register`), its ``model_type``, and what it owns:

    * :meth:`read_config`: its ``config.json`` -> ``ModelArgs`` fields, every field that changes
      the math honoured or refused by name;
    * :meth:`map_tensor`: one checkpoint tensor -> ours (rename, split, permute or drop);
    * ``projections`` (:meth:`layer_projections`) and ``norms``: its module names -> ours;
    * :meth:`rope_blocks`: which rows of which tensor are in HF's rotary order.

    A Llama-like family overrides only what it changes."""

    label: ClassVar[str]  # for messages
    hf_names: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str]
    projections: ClassVar[dict[str, tuple[str, str]]] = LLAMA_PROJECTIONS
    norms: ClassVar[dict[str, str]] = LLAMA_NORMS

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return decoder_fields(cfg, source)

    @classmethod
    def layer_projections(cls, args) -> dict[str, tuple[str, str]]:
        """The projections every layer of a model of ``args`` has: HF name -> (HF parent
        module, our path inside a TransformerBlock)."""
        return cls.projections

    @classmethod
    def rope_blocks(cls, name: str, args) -> list[tuple[int, int]]:
        """The ``(row offset, heads)`` blocks of projection (or q/k norm) ``name`` whose rows
        are in HF's rotary order: q's heads and k's heads."""
        return {
            "q_proj": [(0, args.n_heads)],
            "k_proj": [(0, args.kv_heads)],
            "q_norm": [(0, 1)],
            "k_norm": [(0, 1)],
        }.get(name, [])

    @classmethod
    def rotary_rows(cls, w: torch.Tensor, name: str, args, *, to_meta: bool = True) -> torch.Tensor:
        """``w``'s rows (a weight, bias, norm weight or ``lora_B`` of ``name``) in Meta's
        rotary order (``to_meta``) or back in HF's."""
        blocks = cls.rope_blocks(name, args)
        if not blocks:
            return w
        return permute_rows(w, blocks, args.head_dim, args.rope_dim, to_meta=to_meta)

    @classmethod
    def map_tensor(
        cls, key: str, t: torch.Tensor, args, source: str
    ) -> list[tuple[str, torch.Tensor]]:
        """One checkpoint tensor -> ``[(our key, tensor), ...]``: renamed, q/k rows in Meta's
        rotary order; ``[]`` drops it (a derived buffer); :class:`ConfigError` names a key
        that is not this family's."""
        if key.endswith("rotary_emb.inv_freq"):
            return []  # a derived buffer some old checkpoints carry
        if key in _TOP_LEVEL:
            return [(_TOP_LEVEL[key], t)]
        if (m := _HF_NORM_KEY.match(key)) and m.group(2) in cls.norms:
            name = m.group(2).rsplit(".", 1)[-1]
            ours = f"layers.{m.group(1)}.{cls.norms[m.group(2)]}.weight"
            return [(ours, cls.rotary_rows(t, name, args))]
        if m := _HF_KEY.match(key):
            layer, parent, proj, kind = m.groups()
            projections = cls.layer_projections(args)
            if proj not in projections or projections[proj][0] != parent:
                raise ConfigError(f"{source}: key {key!r} is not a {cls.label} projection")
            ours = f"layers.{layer}.{projections[proj][1]}.{kind}"
            return [(ours, cls.rotary_rows(t, proj, args))]
        raise ConfigError(f"{source}: key {key!r} is not part of a {cls.label} checkpoint")

    @classmethod
    def state_dict_to_ours(
        cls, sd: dict[str, torch.Tensor], args, source: str
    ) -> dict[str, torch.Tensor]:
        """A whole checkpoint mapped one tensor at a time (:meth:`map_tensor`); ``output`` tied
        to the embedding when the checkpoint has no ``lm_head.weight``."""
        out: dict[str, torch.Tensor] = {}
        for key, t in sd.items():
            for ours, tensor in cls.map_tensor(key, t, args, source):
                out[ours] = tensor
        if "output.weight" not in out and "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"].detach()  # an alias, no copy
        return out


def register(*hf_names: str):
    """``@register("LlamaForCausalLM")`` above a :class:`Family` subclass: the config.json
    ``architectures`` names it reads."""

    def add(cls: type[Family]) -> type[Family]:
        cls.hf_names = hf_names
        for name in hf_names:
            if name in REGISTRY:
                raise ValueError(
                    f"{name} is registered twice ({REGISTRY[name].label}, {cls.label})"
                )
            REGISTRY[name] = cls
        return cls

    return add


def registered() -> tuple[type[Family], ...]:
    """Every registered family, in registration order (a family registered later included)."""
    return tuple(dict.fromkeys(REGISTRY.values()))


def family_of(args) -> type[Family]:
    """The family whose names a model of ``args`` (``ModelArgs.family``) takes. A Meta
    ``params.json`` model has Llama's; with MLA attention, DeepSeek-V3's."""
    name = args.family
    if name == "llama" and args.is_mla:
        name = "deepseek_v3"
    for family in registered():
        if family.model_type == name:
            return family
    raise ConfigError(
        f"ModelArgs.family {name!r} is not a registered family (one of "
        f"{', '.join(sorted(f.model_type for f in registered()))})"
    )


def all_projections() -> dict[str, tuple[str, str]]:
    """Every registered family's projections (PEFT's "all-linear" matches these)."""
    out: dict[str, tuple[str, str]] = {}
    for family in registered():
        out.update(family.projections)
    return out


def permute_rows(
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


# The types of the config.json fields the readers below use (null is always allowed: "unset").
# Checked before any reader runs, so a field of the wrong type is one line naming it.
_INT, _NUM, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
_FIELD_TYPES = {
    **dict.fromkeys(
        (
            "hidden_size num_hidden_layers num_attention_heads num_key_value_heads vocab_size "
            "intermediate_size head_dim max_position_embeddings sliding_window "
            "sliding_window_pattern max_window_layers kv_lora_rank qk_rope_head_dim "
            "qk_nope_head_dim v_head_dim q_lora_rank first_k_dense_replace pretraining_tp "
            "original_max_position_embeddings"
        ).split(),
        _INT,
    ),
    **dict.fromkeys(
        (
            "rms_norm_eps rope_theta partial_rotary_factor rope_local_base_freq factor "
            "low_freq_factor high_freq_factor embedding_multiplier residual_multiplier "
            "attention_multiplier logits_scaling final_logit_softcapping query_pre_attn_scalar"
        ).split(),
        _NUM,
    ),
    **dict.fromkeys("attention_bias mlp_bias use_sliding_window rope_interleave".split(), _BOOL),
    **dict.fromkeys("hidden_act hidden_activation model_type rope_type type".split(), _STR),
}
_NESTED = ("rope_parameters", "rope_scaling")  # objects holding more of the fields above


def _is(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, bool if kind == _BOOL else str)


def check_field_types(cfg: dict[str, Any], source: str, where: str = "") -> None:
    """:class:`ConfigError` naming the first field whose value has the wrong JSON type."""
    for key, value in cfg.items():
        name = f"{where}{key}"
        if value is None:
            continue
        kind = _FIELD_TYPES.get(key)
        if kind is not None and not _is(value, kind):
            raise ConfigError(f"{source}: {name} must be {kind}, got {value!r:.80}")
        if key in _NESTED or (where and isinstance(value, dict)):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a JSON object, got {value!r:.80}")
            if name.count(".") < 2:  # Gemma 3 nests one level: {"full_attention": {...}}
                check_field_types(value, source, f"{name}.")
        if key == "layer_types" and not (
            isinstance(value, list) and all(isinstance(t, str) for t in value)
        ):
            raise ConfigError(f"{source}: layer_types must be a list of strings, got {value!r:.80}")
        if key == "no_rope_layers" and not (
            isinstance(value, list) and all(_is(v, _INT) or isinstance(v, bool) for v in value)
        ):
            raise ConfigError(
                f"{source}: no_rope_layers must be a list of 0/1 flags, got {value!r:.80}"
            )


def rope_fields(cfg: dict[str, Any], source: str, params: dict | None = None) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta included); 4.x writes rope_theta + rope_scaling.
    params = (cfg.get("rope_parameters") or {}) if params is None else params
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        out["partial_rotary_factor"] = float(partial)
    if rope_type in ("default", None):
        return out
    if rope_type == "linear":
        out["rope_linear_factor"] = float(merged.get("factor", 1.0))
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
        f"{source}: rope scaling type {rope_type!r} is not supported (supported: default, "
        "linear, llama3)"
    )


def require(cfg: dict[str, Any], source: str, *keys: str) -> None:
    for key in keys:
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: missing field {key!r}")


def refuse(cfg: dict[str, Any], source: str, **why: str) -> None:
    """Fields this family's reader does not implement: an error naming them when set."""
    for key, reason in why.items():
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}={cfg[key]!r} is not supported ({reason})")


def layer_types(cfg: dict[str, Any], source: str, n_layers: int) -> dict[str, Any]:
    """``layer_types``/``sliding_window``: transformers 5 lists each layer's attention;
    older configs give a ``sliding_window`` (Mistral, Phi-3: every layer) or
    ``use_sliding_window`` + ``max_window_layers`` (Qwen2: layers from that index on)."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        unknown = sorted({t for t in types if t not in names})
        if unknown or len(types) != n_layers:
            raise ConfigError(
                f"{source}: layer_types must list {n_layers} of {sorted(names)}, got {types}"
            )
        types = [names[t] for t in types]
        if cfg.get("use_sliding_window") is False:
            types = ["full"] * n_layers  # Qwen2/3, SmolLM3 list the types but switch them off
    elif cfg.get("sliding_window_pattern"):  # Gemma 3 before layer_types: every Nth is full
        n = cfg["sliding_window_pattern"]
        types = ["full" if (i + 1) % n == 0 else "sliding" for i in range(n_layers)]
    elif cfg.get("use_sliding_window"):
        first = cfg.get("max_window_layers", 0)
        types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    elif window and cfg.get("use_sliding_window") is None:
        types = ["sliding"] * n_layers
    if not types or "sliding" not in types:
        return {}
    if not isinstance(window, int) or window <= 0:
        raise ConfigError(
            f"{source}: sliding layers need a positive sliding_window, got {window!r}"
        )
    return {"layer_types": tuple(types), "sliding_window": window}


def decoder_fields(cfg: dict[str, Any], source: str, *, act_key: str = "hidden_act") -> dict:
    """The fields every Llama-like family shares, honoured (or refused) by name."""
    require(cfg, source, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    act = cfg.get(act_key, "silu")
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if act not in acts:
        raise ConfigError(
            f"{source}: {act_key} {act!r} is not supported (silu or gelu_pytorch_tanh, gated)"
        )
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
    dim, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    fields = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg["vocab_size"],
        "hidden_dim": cfg.get("intermediate_size"),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "hidden_act": acts[act],
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "attention_out_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        **rope_fields(cfg, source),
        **layer_types(cfg, source, layers),
    }
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(dim, int) and isinstance(heads, int) and heads:
        if head_dim * heads != dim:
            fields["head_dim_override"] = int(head_dim)
    if cfg.get("max_position_embeddings"):
        fields["max_seq_len"] = int(cfg["max_position_embeddings"])
    return fields
