"""``ExportConfig``: everything one ``export_llama`` run needs, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import ConfigError
from edgelora.models.args import ModelArgs
from edgelora.quant.embedding import EMBEDDING_BITS
from edgelora.quant.linear import QMODES


@dataclass(frozen=True)
class AdapterSpec:
    """``--lora [NAME=]DIR``: where an adapter lives and what its program is called."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, Path(text.rstrip("/")).name
        if not path:
            raise ConfigError(f"--lora {text!r}: expected [NAME=]DIR")
        return cls(name, Path(path))


@dataclass(frozen=True)
class ExportConfig:
    model_args: ModelArgs
    output_dir: Path
    checkpoint: Path | None = None
    adapters: tuple[AdapterSpec, ...] = field(default_factory=tuple)
    qmode: str = "8da4w"
    group_size: int = 32
    embedding_bits: int = 0
    embedding_group_size: int = 0
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.qmode not in QMODES:
            raise ConfigError(f"qmode must be one of {QMODES}, got {self.qmode!r}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0, got {self.group_size}")
        if self.qmode != "none" and self.group_size % 32:
            raise ConfigError(
                f"group_size {self.group_size} is not supported by XNNPACK's groupwise kernels: "
                "use 0 (per channel) or a multiple of 32"
            )
        if self.qmode != "none" and self.group_size:
            divisible = [
                n
                for n in (self.model_args.dim, self.model_args.ffn_hidden_dim)
                if n % self.group_size == 0
            ]
            if not divisible:
                raise ConfigError(
                    f"group_size {self.group_size} divides no linear's in_features "
                    f"(dim {self.model_args.dim}, hidden {self.model_args.ffn_hidden_dim}): "
                    "nothing would be quantized"
                )
        if self.embedding_bits not in EMBEDDING_BITS:
            raise ConfigError(
                f"embedding_bits must be one of {EMBEDDING_BITS}, got {self.embedding_bits}"
            )
        if (
            self.embedding_bits
            and self.embedding_group_size
            and (self.model_args.dim % self.embedding_group_size)
        ):
            raise ConfigError(
                f"embedding_group_size {self.embedding_group_size} does not divide dim "
                f"{self.model_args.dim}"
            )
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"adapter names must be unique, repeated: {dupes}")
