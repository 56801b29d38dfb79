"""``ModelArgs``: the Llama configuration, read from a Meta-style ``params.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora._jsonfile import read_json
from edgelora.errors import ConfigError

ATTENTION_TYPES = ("gqa", "mla")
HIDDEN_ACTS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")


MAX_INT = 1 << 31


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama transformer.

    Field names follow Meta's ``params.json``. ``hidden_dim`` may be given directly; otherwise it
    is derived from ``dim``, ``multiple_of`` and ``ffn_dim_multiplier`` the way Meta's reference
    code does. ``max_seq_len`` is the KV-cache length (the longest prompt + generation).
    """

    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 256
    hidden_dim: int | None = None
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    # Llama 3.1-style rope scaling (used when use_scaled_rope); defaults are Llama 3.1's.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 128
    # Attention: "gqa" (Llama) or "mla" (DeepSeek-V2/V3 multi-head latent attention). The MLA
    # fields below are 0 for "gqa". q_lora_rank=0 means a plain wq (no query latent).
    attention_type: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MLA only: run wq_a and wkv_a as one matmul wq_kv_a (needs q_lora_rank > 0).
    fused_mla_lora_proj: bool = False
    # --- Features of the Hugging Face families (defaults: Llama) -------------------------
    # Per-head size when it is not dim / n_heads (Qwen3, Gemma 3); None: dim / n_heads.
    head_dim_override: int | None = None
    attention_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    attention_out_bias: bool = False  # the output projection too (Granite attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1 + w
    sandwich_norms: bool = False  # Gemma 3: norms after attention and MLP too (4 per layer)
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_tanh
    embedding_scale: float = 1.0  # Gemma sqrt(dim), Granite embedding_multiplier
    attention_scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim)
    residual_scale: float = 1.0  # Granite residual_multiplier
    logits_scaling: float = 1.0  # logits are divided by it (Granite)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcap: float | None = None  # the same on attention scores
    partial_rotary_factor: float = 1.0  # fraction of each head rotary embeddings touch
    # Per layer: "full" or "sliding" (attention over the last sliding_window positions).
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # rotary base of sliding layers (Gemma 3)
    rope_linear_factor: float = 1.0  # "linear" rope scaling of full layers: positions / factor
    nope_layers: tuple[int, ...] = ()  # layers without rotary embeddings (SmolLM3)
    # The Hugging Face family (its model_type) whose names the checkpoint and PEFT adapters
    # use for the projections and norms (weights/families); a Meta params.json model: Llama's.
    family: str = "llama"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # no size reaches 2**31 (torch takes int64 shapes)
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, int) and not -MAX_INT <= v < MAX_INT for v in values):
                raise ConfigError(f"ModelArgs.{f.name} is out of range: {value!r:.60}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        kv = self.n_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0):
            raise ConfigError(f"ModelArgs.n_kv_heads must be a positive integer, got {kv!r}")
        if not isinstance(self.family, str) or not self.family:
            raise ConfigError(
                f"ModelArgs.family must be a family's model_type, got {self.family!r}"
            )
        self._check_attention()
        self._check_features()
        if self.hidden_dim is not None and (
            not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0
        ):
            raise ConfigError(
                f"ModelArgs.hidden_dim must be a positive integer, got {self.hidden_dim!r}"
            )
        if not (self.norm_eps > 0):
            raise ConfigError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps!r}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"ModelArgs.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.use_scaled_rope and not (
            self.rope_scale_factor > 0
            and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
            and self.rope_original_max_seq_len > 0
        ):
            raise ConfigError(
                "rope scaling needs rope_scale_factor > 0, 0 < rope_low_freq_factor < "
                "rope_high_freq_factor and rope_original_max_seq_len > 0"
            )

    def _check_attention(self) -> None:
        mla_fields = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")
        mla_fields += ("v_head_dim",)
        if self.attention_type not in ATTENTION_TYPES:
            raise ConfigError(
                f"ModelArgs.attention_type must be one of {ATTENTION_TYPES}, "
                f"got {self.attention_type!r}"
            )
        for name in mla_fields:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ModelArgs.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.fused_mla_lora_proj, bool):
            raise ConfigError(
                f"ModelArgs.fused_mla_lora_proj must be true or false, "
                f"got {self.fused_mla_lora_proj!r}"
            )
        if self.fused_mla_lora_proj and self.attention_type != "mla":
            raise ConfigError(
                "ModelArgs.fused_mla_lora_proj=True requires attention_type='mla' "
                f"(got attention_type={self.attention_type!r})"
            )
        if self.fused_mla_lora_proj and self.q_lora_rank == 0:
            raise ConfigError(
                "ModelArgs.fused_mla_lora_proj=True requires q_lora_rank > 0 (with "
                "q_lora_rank=0 the query has no wq_a to fuse with wkv_a)"
            )
        if self.attention_type == "gqa":
            used = [f"{n}={getattr(self, n)}" for n in mla_fields if getattr(self, n)]
            if used:
                raise ConfigError(
                    f"ModelArgs.{', '.join(used)}: MLA field(s) set with attention_type='gqa' "
                    "(set attention_type='mla' or leave them 0)"
                )
            if self.dim % self.n_heads and self.head_dim_override is None:
                raise ConfigError(
                    f"ModelArgs.n_heads={self.n_heads} does not divide ModelArgs.dim={self.dim}"
                )
            if self.n_heads % self.kv_heads:
                raise ConfigError(
                    f"ModelArgs.n_kv_heads={self.kv_heads} does not divide ModelArgs.n_heads="
                    f"{self.n_heads} (grouped-query attention needs equal groups)"
                )
            if self.head_dim % 2:
                raise ConfigError(
                    f"head dim dim/n_heads={self.head_dim} must be even for rotary embeddings"
                )
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"ModelArgs.{name} must be > 0 for attention_type='mla', "
                    f"got {getattr(self, name)}"
                )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"ModelArgs.qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary "
                "embeddings"
            )
        if self.n_kv_heads not in (None, self.n_heads):
            raise ConfigError(
                f"ModelArgs.n_kv_heads={self.n_kv_heads} with attention_type='mla': MLA shares "
                "one latent across all heads; leave n_kv_heads unset (or equal to n_heads)"
            )
        if self.use_scaled_rope:
            raise ConfigError(
                "ModelArgs.use_scaled_rope=True is not supported with attention_type='mla' "
                "(DeepSeek's yarn rope scaling is not implemented)"
            )

    def _check_features(self) -> None:
        if self.head_dim_override is not None and (
            not isinstance(self.head_dim_override, int) or self.head_dim_override <= 0
        ):
            raise ConfigError(
                f"ModelArgs.head_dim_override must be a positive integer, got "
                f"{self.head_dim_override!r}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(
                f"ModelArgs.hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}"
            )
        for name in ("embedding_scale", "residual_scale", "logits_scaling"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ConfigError(f"ModelArgs.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("attention_scale", "final_logit_softcap", "attn_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"ModelArgs.{name} must be > 0 or null, got {value!r}")
        if not (0 < self.partial_rotary_factor <= 1):
            raise ConfigError(
                f"ModelArgs.partial_rotary_factor must be in (0, 1], got "
                f"{self.partial_rotary_factor!r}"
            )
        if self.rope_dim % 2:
            raise ConfigError(f"rotary dims per head ({self.rope_dim}) must be even")
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)
            if len(types) != self.n_layers or not set(types) <= set(LAYER_TYPES):
                raise ConfigError(
                    f"ModelArgs.layer_types must give one of {LAYER_TYPES} for each of the "
                    f"{self.n_layers} layers, got {list(types)}"
                )
            if "sliding" in types and not (
                isinstance(self.sliding_window, int) and self.sliding_window > 0
            ):
                raise ConfigError(
                    "ModelArgs.layer_types has sliding layers but sliding_window is "
                    f"{self.sliding_window!r}"
                )
        nope = tuple(self.nope_layers)
        object.__setattr__(self, "nope_layers", nope)
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in nope):
            raise ConfigError(
                f"ModelArgs.nope_layers must be layer indices < {self.n_layers}, got {list(nope)}"
            )
        if self.is_mla and (
            self.qk_norm
            or self.attention_bias
            or self.layer_types
            or nope
            or self.attn_logit_softcap
        ):
            raise ConfigError(
                "ModelArgs: qk_norm, attention_bias, layer_types, nope_layers and "
                "attn_logit_softcap are not supported with attention_type='mla'"
            )

    def layer_type(self, i: int) -> str:
        """``"full"`` or ``"sliding"`` for layer ``i``."""
        return "full" if self.layer_types is None else self.layer_types[i]

    @property
    def is_mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: ``head_dim`` (GQA) or ``qk_nope + qk_rope`` (MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head: ``head_dim`` times ``partial_rotary_factor`` (GQA),
        ``qk_rope_head_dim`` (MLA)."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """The SwiGLU hidden size (Meta's rule unless ``hidden_dim`` is set)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, params: dict[str, Any], *, source: str = "params") -> ModelArgs:
        """Build from a ``params.json``-style dict; unknown keys are an error naming them."""
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(params).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | {"hf_fused_projections"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unsupported field(s) {unknown}; known fields are {sorted(known)}"
            )
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        if "hf_fused_projections" in params:  # what exports before `family` recorded (Phi-3)
            fused = params.pop("hf_fused_projections")
            params.setdefault("family", "phi3" if fused else "llama")
        try:
            return cls(**params)
        except TypeError as e:  # wrong value types that dataclass construction trips on
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> ModelArgs:
        """Read a Meta-style ``params.json``; ``overrides`` (e.g. ``max_seq_len``) win."""
        params = read_json(path, ConfigError, "params file")
        if isinstance(params, dict):
            params = {**params, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(params, source=str(path))
