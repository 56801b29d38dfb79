"""``ModelArgs``: the Llama configuration, read from a Meta-style ``params.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora._jsonfile import read_json
from edgelora.errors import ConfigError


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

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        kv = self.n_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0):
            raise ConfigError(f"ModelArgs.n_kv_heads must be a positive integer, got {kv!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"ModelArgs.n_heads={self.n_heads} does not divide ModelArgs.dim={self.dim}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"ModelArgs.n_kv_heads={self.kv_heads} does not divide "
                f"ModelArgs.n_heads={self.n_heads} (grouped-query attention needs equal groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head dim dim/n_heads={self.head_dim} must be even for rotary embeddings"
            )
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
