"""``FoundationSpec``: what the foundation every program of an export shares is built from, and
the one place its settings have defaults.

The same spec gives bit-identical weights (so the output-match check can rebuild the eager
reference). It is validated when made, and it is the only mapping between those settings and
their other forms: :meth:`FoundationSpec.resolve` takes ``export_llama``'s flags (a recipe and
the fields that override it), :meth:`FoundationSpec.of_export` reads a manifest back,
:meth:`FoundationSpec.quantization_entry` writes it, and :meth:`FoundationSpec.flags` names the
settings as the flags do (``edgelora-add`` refuses a flag that differs from the export's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from edgelora.errors import ConfigError
from edgelora.format.manifest import QuantizationEntry
from edgelora.lora.fusion import FUSE_MODES
from edgelora.models.llama import LOGITS_MODES, SDPA_MODES
from edgelora.quant.recipe import DEFAULT_RECIPE, Recipe, preset

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUTPUT_BITS = (0, 8)  # --output-bits: 0: the output layer as the other linears; 8: int8 8da8w


@dataclass(frozen=True)
class FoundationSpec:
    """The foundation's settings: the quantization recipe (resolved: a preset with the fields
    a caller overrode) and what the traced model is. Every default of an export's settings is
    here (``export_llama``'s flags default to these)."""

    recipe: Recipe = field(default_factory=lambda: preset(DEFAULT_RECIPE))
    checkpoint: Path | str | None = None
    seed: int = 0  # the random weights' seed when there is no checkpoint
    calibration: str | None = None  # calibration text (None: the built-in prose)
    tokenizer: str | None = None  # the tokenizer.json calibration text is encoded with
    dtype: str = "fp32"  # the programs' compute dtype
    fuse: str = "none"  # which projections run as one fused matmul
    sdpa: str = "custom"  # attention kernels: ExecuTorch's custom ops, or plain PyTorch ops
    logits: str = "all"  # forward's logits: every position, or the last one only

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise ConfigError(f"recipe must be a Recipe (or use resolve()), got {self.recipe!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name, allowed in (
            ("dtype", tuple(DTYPES)),
            ("fuse", FUSE_MODES),
            ("sdpa", SDPA_MODES),
            ("logits", LOGITS_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.dtype == "bf16":
            # Measured with executorch 1.5.1: XNNPACK delegates no bf16 linear (8da4w fails to
            # lower; fp32 weights stay in the .pte on portable kernels, outside the foundation).
            raise ConfigError(
                "--dtype bf16 is not supported: XNNPACK in executorch 1.5.1 does not delegate "
                "bf16 linears; use fp32 (the default; bf16 checkpoints are upcast) or fp16"
            )
        r = self.recipe
        grouped = r.qmode == "8da4w" or r.output_qmode == "8da4w"
        if grouped and r.group_size % 32:
            raise ConfigError(
                f"group_size {r.group_size} is not supported by XNNPACK's groupwise kernels: "
                "use 0 (per channel) or a multiple of 32"
            )
        if r.qmode == "8da8w" and r.group_size:
            raise ConfigError(
                f"--qmode 8da8w with --group-size {r.group_size}: XNNPACK has no grouped int8 "
                "kernel (int8 weights take one scale per output channel); use --group-size 0"
            )
        if self.calibration is not None and not self.calibrated:
            raise ConfigError(
                f"--calibration: recipe {r.name} does not calibrate (one that does: q4_k_m)"
            )

    # -- the recipe's fields, read through ------------------------------------------------
    qmode = property(lambda self: self.recipe.qmode)
    group_size = property(lambda self: self.recipe.group_size)
    qparams = property(lambda self: self.recipe.qparams)
    embedding_bits = property(lambda self: self.recipe.embedding_bits)
    embedding_group_size = property(lambda self: self.recipe.embedding_group_size)
    gptq = property(lambda self: self.recipe.gptq)
    upgrade = property(lambda self: self.recipe.upgrade)
    upgrade_qmode = property(lambda self: self.recipe.upgrade_qmode)
    output = property(lambda self: self.recipe.output_qmode, doc="The output layer's qmode.")

    @property
    def output_bits(self) -> int:
        """``--output-bits``: 8 when the output layer alone is 8da8w."""
        r = self.recipe
        return 8 if r.output_qmode == "8da8w" != r.qmode else 0

    calibrated = property(lambda self: self.recipe.calibrated, doc="Reads calibration text.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_model(self, args) -> None:
        """Refuse what this spec cannot do to a model of ``args`` (``ModelArgs``)."""
        r = self.recipe
        if (r.qmode == "8da4w" or r.output_qmode == "8da4w") and r.group_size:
            if not any(n % r.group_size == 0 for n in (args.dim, args.ffn_hidden_dim)):
                raise ConfigError(
                    f"group_size {r.group_size} divides no linear's in_features (dim "
                    f"{args.dim}, hidden {args.ffn_hidden_dim}): nothing would be quantized"
                )
        if r.embedding_bits and r.embedding_group_size and args.dim % r.embedding_group_size:
            raise ConfigError(
                f"embedding_group_size {r.embedding_group_size} does not divide dim {args.dim}"
            )
        if self.fuse == "qkv" and args.is_mla:
            raise ConfigError(
                "--fuse qkv: an MLA model (attention_type='mla') has no wq/wk/wv; use --fuse mla "
                "(wq_a + wkv_a) or --fuse all"
            )
        if self.fuse == "mla" and not (args.is_mla and args.q_lora_rank):
            raise ConfigError(
                "--fuse mla needs an MLA model with q_lora_rank > 0 (got attention_type="
                f"{args.attention_type!r}, q_lora_rank={args.q_lora_rank})"
            )

    # -- the other forms of these settings --------------------------------------------------
    @classmethod
    def resolve(
        cls,
        recipe: str | None = None,
        *,
        qmode: str | None = None,
        group_size: int | None = None,
        qparams: str | None = None,
        embedding_bits: int | None = None,
        embedding_group_size: int | None = None,
        output_bits: int | None = None,
        **settings: Any,
    ) -> FoundationSpec:
        """A spec from ``export_llama``'s flags: the preset ``recipe`` (default: the default
        recipe) with the fields given (None: the preset's), and the other ``settings``."""
        base = preset(recipe or cls().recipe.name)
        if output_bits is not None and output_bits not in OUTPUT_BITS:
            raise ConfigError(f"output_bits must be one of {OUTPUT_BITS}, got {output_bits}")
        if output_bits and (qmode or base.qmode) == "none":
            raise ConfigError("output_bits 8 quantizes the output layer: it needs a qmode")
        overrides: dict[str, Any] = dict(
            qmode=qmode,
            group_size=group_size,
            qparams=qparams,
            embedding_bits=embedding_bits,
            embedding_group_size=embedding_group_size,
        )
        if qmode is not None and qmode != base.qmode:
            # another precision for the linears: the output follows them unless told, and the
            # 4-bit-only steps (GPTQ) and the measured upgrades do not apply
            overrides.update(output_qmode=qmode, gptq=False, upgrade=0.0)
            if qmode == "none":
                overrides.update(embedding_bits=embedding_bits or 0)
        if output_bits == 8:
            overrides["output_qmode"] = "8da8w"
        elif output_bits == 0:
            overrides["output_qmode"] = qmode or base.qmode
        if (qmode or base.qmode) == "8da8w" and group_size is None:
            overrides["group_size"] = 0  # int8 weights take one scale per output channel
        return cls(recipe=base.with_overrides(**overrides), **settings)

    @classmethod
    def by_hand(cls, name: str = "custom", **given: Any) -> FoundationSpec:
        """A spec whose recipe is written out: ``Recipe`` fields (``qmode``, ``group_size``,
        ...; a recipe's own defaults for the rest, except that the output layer follows
        ``qmode`` unless ``output_qmode`` or ``output_bits=8`` says otherwise) and settings."""
        names = {f.name for f in fields(Recipe)}
        quant = {k: v for k, v in given.items() if k in names}
        output_bits = given.pop("output_bits", 0)
        if "output_qmode" not in quant:
            qmode = quant.get("qmode", Recipe.qmode)
            quant["output_qmode"] = "8da8w" if output_bits == 8 and qmode != "none" else qmode
        settings = {k: v for k, v in given.items() if k not in names}
        return cls(recipe=Recipe(name, **quant), **settings)

    @classmethod
    def of_export(cls, manifest, out_dir=None, **overrides: Any) -> FoundationSpec:
        """The spec an export's foundation was built with, from its manifest (``overrides``:
        e.g. ``checkpoint``, ``sdpa``). ``out_dir``: the export, whose tokenizer a calibrating
        recipe encodes its calibration text with again."""
        q = manifest.quantization
        output = q.output_qmode
        if output is None:  # exports before recipes recorded output_bits only
            output = "8da8w" if q.output_bits == 8 and q.qmode != "none" else q.qmode
        recipe = Recipe(
            name=q.recipe,
            qmode=q.qmode,
            group_size=q.group_size,
            qparams=q.qparams,
            gptq=q.gptq,
            upgrade=q.upgrade,
            upgrade_qmode=q.upgrade_qmode,
            output_qmode=output,
            embedding_bits=q.embedding_bits,
            embedding_group_size=q.embedding_group_size,
        )
        tokenizer = None
        if out_dir is not None and manifest.tokenizer is not None:
            tokenizer = str(Path(out_dir) / manifest.tokenizer)
        settings = dict(
            recipe=recipe,
            checkpoint=manifest.checkpoint,
            seed=manifest.seed,
            calibration=q.calibration,
            tokenizer=tokenizer,
            dtype=manifest.dtype,
            fuse=manifest.fuse,
            sdpa=manifest.sdpa,
            logits=manifest.logits,
        )
        return cls(**{**settings, **overrides})

    def quantization_entry(self, **measured: Any) -> QuantizationEntry:
        """The manifest's record of this spec's quantization (``measured``: what building the
        foundation found -- per-tensor errors, sensitivities, the calibration's sha256)."""
        r = self.recipe
        return QuantizationEntry(
            qmode=r.qmode,
            group_size=r.group_size,
            embedding_bits=r.embedding_bits,
            embedding_group_size=r.embedding_group_size,
            qparams=r.qparams,
            output_bits=self.output_bits,
            output_qmode=r.output_qmode,
            recipe=r.name,
            gptq=r.gptq,
            upgrade=r.upgrade,
            upgrade_qmode=r.upgrade_qmode,
            calibration=self.calibration,
            **measured,
        )

    def manifest_settings(self) -> dict[str, Any]:
        """The manifest's fields that record this spec (what :meth:`of_export` reads back)."""
        return dict(
            seed=self.seed,
            dtype=self.dtype,
            fuse=self.fuse,
            sdpa=self.sdpa,
            logits=self.logits,
            checkpoint=None if self.checkpoint is None else os.path.realpath(self.checkpoint),
        )

    def flags(self) -> dict[str, Any]:
        """These settings under the names of ``export_llama``'s flags (``--qmode`` ...)."""
        r = self.recipe
        return {
            "recipe": r.name,
            "qmode": r.qmode,
            "group_size": r.group_size,
            "qparams": r.qparams,
            "output_bits": self.output_bits,
            "embedding_bits": r.embedding_bits,
            "embedding_group_size": r.embedding_group_size,
            "dtype": self.dtype,
            "fuse": self.fuse,
            "sdpa": self.sdpa,
            "logits": self.logits,
        }


def spec_default(name: str) -> Any:
    """The default of setting ``name`` (``recipe``: the default preset's name): what the flag
    of that name defaults to."""
    if name == "recipe":
        return FoundationSpec().recipe.name
    (f,) = (f for f in fields(FoundationSpec) if f.name == name)
    return f.default
