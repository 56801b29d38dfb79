"""What every family shares: the :class:`Family` base and its registry, the JSON types of the
``config.json`` fields the readers use (checked first), and the readers of the fields every
Llama-like family has (rope, sliding layers, the decoder's sizes)."""

from __future__ import annotations

from typing import Any, ClassVar

from edgelora.errors import ConfigError
from edgelora.weights.hf_names import LLAMA_NORMS

REGISTRY: dict[str, type[Family]] = {}  # "architectures" name -> its family, in registration order


class Family:
    """A Hugging Face model family: the ``architectures`` names it takes (given to
    :func:`register`), its ``model_type``, its layer-norm names, and :meth:`read_config`, which
    turns its ``config.json`` into ``ModelArgs`` fields -- every field that changes the math
    honoured or refused by name."""

    label: ClassVar[str]  # for messages
    hf_names: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str]
    norms: ClassVar[dict[str, str]] = LLAMA_NORMS  # HF layer-norm name -> ours

    @classmethod
    def read_config(cls, cfg: dict[str, Any], source: str) -> dict[str, Any]:
        return decoder_fields(cfg, source)


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
