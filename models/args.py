"""``ModelArgs``: the Llama configuration, read from a Meta-style ``params.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora._jsonfile import read_json
from edgelora.errors import ConfigError

ATTENTION_TYPES = ("gqa", "mla")


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

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        kv = self.n_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0):
            raise ConfigError(f"ModelArgs.n_kv_heads must be a positive integer, got {kv!r}")
        self._check_attention()
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
            if self.dim % self.n_heads:
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

    @property
    def is_mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: ``head_dim`` (GQA) or ``qk_nope + qk_rope`` (MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head: all of ``head_dim`` (GQA), ``qk_rope_head_dim`` (MLA)."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unsupported field(s) {unknown}; known fields are {sorted(known)}"
            )
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
