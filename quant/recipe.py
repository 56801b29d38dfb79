"""Quantization recipes: the named presets ``--recipe NAME`` offers, defined once for the CLI and
the Python API (:class:`~edgelora.export.config.ExportConfig` takes its defaults from here).

Every precision is one XNNPACK in ExecuTorch 1.5.1 runs on the CPU:

============  =====================================================================
qmode         weights / activations, XNNPACK kernel
============  =====================================================================
``8da4w``     int4 in groups of ``group_size`` (bf16 scales), int8 dynamic per token
              (QD8-F32-QB4W)
``8da8w``     int8 per output channel, int8 dynamic per token (QD8-F32-QC8W)
``8w``        int8 per output channel, fp32 activations (F32-QC8W: no activation
              quantization error)
``none``      float
============  =====================================================================

The presets are named after llama.cpp's types they stand beside (same role, not the same
bits: XNNPACK has no 5- or 6-bit kernel, so "K" here means "spend bits where they are
measured to matter", as llama.cpp's K-quant mixes do):

* ``q4_0``: every linear and the output layer 8da4w g32, the embedding int4 g32 -- the
  smallest file; no calibration.
* ``q4_k_s`` / ``q4_k_m``: 8da4w g32 linears rounded by GPTQ on calibration text; the linears
  whose 4-bit error costs the most KL divergence per byte saved, measured one tensor at a time
  on the calibration text, are kept int8 (``8w``) until ``upgrade`` of the linear weights are
  (s: 1/8, m: 1/3); the output layer ``8w`` and the embedding int8 per row, which for a tied
  embedding are the same bytes (ExecuTorch's data store keeps identical constants once), so the
  pair costs one int8 table.
* ``q8_0``: every linear ``8w``, embedding and output int8 as above.
* ``f32``: no quantization.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from edgelora.errors import ConfigError

QMODES = ("none", "8da4w", "8da8w", "8w")
QPARAMS = ("affine", "hqq")
EMBEDDING_BITS = (0, 4, 8)


@dataclass(frozen=True)
class Recipe:
    """How the foundation is quantized. ``upgrade`` > 0 or ``gptq`` need calibration text."""

    name: str
    qmode: str = "8da4w"  # every linear's precision unless upgraded
    group_size: int = 32  # 8da4w's group along in_features (0: one scale per channel)
    qparams: str = "hqq"  # 8da4w scales without GPTQ: min/max (affine) or HQQ's search
    gptq: bool = False  # 8da4w weights rounded by GPTQ (calibration)
    upgrade: float = 0.0  # share of the linears' weights given upgrade_qmode, most sensitive first
    upgrade_qmode: str = "8w"
    output_qmode: str = "8da4w"  # the output layer
    embedding_bits: int = 0  # 0: float (the checkpoint's dtype)
    embedding_group_size: int = 32  # 0: one scale per row
    summary: str = field(default="", compare=False)  # for --help; not part of the recipe

    def __post_init__(self) -> None:
        for name in ("qmode", "upgrade_qmode", "output_qmode"):
            if getattr(self, name) not in QMODES:
                raise ConfigError(f"{name} must be one of {QMODES}, got {getattr(self, name)!r}")
        if self.qparams not in QPARAMS:
            raise ConfigError(f"qparams must be one of {QPARAMS}, got {self.qparams!r}")
        if self.embedding_bits not in EMBEDDING_BITS:
            raise ConfigError(
                f"embedding_bits must be one of {EMBEDDING_BITS}, got {self.embedding_bits!r}"
            )
        if not 0.0 <= self.upgrade <= 1.0:
            raise ConfigError(f"upgrade must be a share in [0, 1], got {self.upgrade!r}")
        for name in ("group_size", "embedding_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def calibrated(self) -> bool:
        """Whether the recipe reads calibration text (GPTQ, which rounds 8da4w weights, or
        measured upgrades)."""
        return self.qmode != "none" and (self.gptq and self.qmode == "8da4w" or self.upgrade > 0)

    def with_overrides(self, **overrides) -> Recipe:
        """This recipe with some fields replaced (flags given beside ``--recipe``)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown recipe fields {sorted(unknown)}")
        if not given:
            return self
        changed = {k: v for k, v in given.items() if getattr(self, k) != v}
        if not changed:
            return self
        label = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
        return replace(self, **changed, name=f"{self.name} ({label})")

    def describe(self) -> str:
        parts = [
            f"linears {self.qmode}" + (f" g{self.group_size}" if self.qmode == "8da4w" else "")
        ]
        if self.qmode == "8da4w":
            parts.append("GPTQ" if self.gptq else f"{self.qparams} scales")
        if self.upgrade:
            parts.append(f"most sensitive {self.upgrade:.0%} {self.upgrade_qmode}")
        parts.append(f"output {self.output_qmode}")
        emb = "float" if not self.embedding_bits else f"int{self.embedding_bits}"
        if self.embedding_bits:
            emb += f" g{self.embedding_group_size}" if self.embedding_group_size else " per row"
        parts.append(f"embedding {emb}")
        return ", ".join(parts)


_TIED8 = dict(output_qmode="8w", embedding_bits=8, embedding_group_size=0)
PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("f32", qmode="none", output_qmode="none", summary="no quantization"),
        Recipe(
            "q4_0",
            output_qmode="8da4w",
            embedding_bits=4,
            embedding_group_size=32,
            summary="smallest: everything 4-bit g32, no calibration",
        ),
        Recipe(
            "q4_k_s",
            gptq=True,
            upgrade=1 / 8,
            **_TIED8,
            summary="4-bit GPTQ, the most sensitive 1/8 of the linears int8, int8 output/embedding",
        ),
        Recipe(
            "q4_k_m",
            gptq=True,
            upgrade=1 / 3,
            **_TIED8,
            summary="4-bit GPTQ, the most sensitive 1/3 of the linears int8, int8 output/embedding",
        ),
        Recipe(
            "q8_0",
            qmode="8w",
            **_TIED8,
            summary="int8 weights everywhere, fp32 activations",
        ),
    )
}
DEFAULT_RECIPE = "q4_k_m"


def preset(name: str) -> Recipe:
    """The preset ``name``; :class:`ConfigError` naming the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}: one of {sorted(PRESETS)}") from None
