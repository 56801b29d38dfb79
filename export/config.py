"""``ExportConfig``: everything one ``export_llama`` run needs, validated once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from edgelora.errors import ConfigError
from edgelora.format.adapter_inputs import ADAPTER_DTYPES
from edgelora.lora.fusion import FUSE_MODES
from edgelora.models.args import ModelArgs
from edgelora.models.llama import LOGITS_MODES, SDPA_MODES
from edgelora.quant.recipe import (
    DEFAULT_RECIPE,
    EMBEDDING_BITS,
    QMODES,
    QPARAMS,
    Recipe,
    preset,
)

OUTPUT_BITS = (0, 8)  # 0: the output layer as the other linears; 8: int8 per output channel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The export's defaults, in one place: ExportConfig's fields, FoundationSpec's and export_llama's
# flags all read them (tests/export/test_defaults.py holds every reader to them). The
# quantization defaults are quant/recipe.py's: the DEFAULT_RECIPE preset for an export, the
# Recipe fields' own defaults for a FoundationSpec built by hand.
DEFAULT_DTYPE, DEFAULT_FUSE, DEFAULT_SDPA, DEFAULT_LOGITS, DEFAULT_SEED = (
    "fp32",
    "none",
    "custom",
    "all",
    0,
)
_RECIPE_FIELDS = {f.name: f.default for f in fields(Recipe)}


@dataclass(frozen=True)
class FoundationSpec:
    """What the foundation every program of an export shares is built from: the same spec
    gives bit-identical weights (so the output-match check can rebuild the eager reference)."""

    checkpoint: Path | str | None = None
    seed: int = DEFAULT_SEED
    qmode: str = _RECIPE_FIELDS["qmode"]
    group_size: int = _RECIPE_FIELDS["group_size"]
    embedding_bits: int = _RECIPE_FIELDS["embedding_bits"]
    embedding_group_size: int = _RECIPE_FIELDS["embedding_group_size"]
    qparams: str = _RECIPE_FIELDS["qparams"]  # how the linears' weight scales are chosen
    output_bits: int = 0  # 8: the output layer 8da8w per channel, whatever qmode says
    output_qmode: str | None = None  # the output layer's qmode (None: from output_bits)
    gptq: bool = _RECIPE_FIELDS["gptq"]  # 8da4w weights rounded by GPTQ on calibration text
    upgrade: float = _RECIPE_FIELDS["upgrade"]  # share of the linears given upgrade_qmode
    upgrade_qmode: str = _RECIPE_FIELDS["upgrade_qmode"]
    calibration: str | None = None  # calibration text (None: the built-in prose)
    tokenizer: str | None = None  # the tokenizer.json calibration text is encoded with
    recipe: str = "custom"  # the recipe's name, for the log and the manifest
    dtype: str = DEFAULT_DTYPE
    fuse: str = DEFAULT_FUSE
    sdpa: str = DEFAULT_SDPA  # attention kernels of the traced model
    logits: str = DEFAULT_LOGITS  # forward's logits: every position, or the last one only

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def output(self) -> str:
        """The output layer's qmode."""
        if self.output_qmode is not None:
            return self.output_qmode
        if self.output_bits == 8 and self.qmode != "none":
            return "8da8w"
        return self.qmode

    @property
    def calibrated(self) -> bool:
        return self.qmode != "none" and (self.gptq and self.qmode == "8da4w" or self.upgrade > 0)

    @classmethod
    def of_export(cls, manifest, out_dir=None, **overrides) -> FoundationSpec:
        """The spec an export's foundation was built with, from its manifest (``overrides``:
        e.g. ``checkpoint``, ``sdpa``). ``out_dir``: the export, whose tokenizer a calibrating
        recipe encodes its calibration text with again."""
        q = manifest.quantization
        tokenizer = None
        if out_dir is not None and manifest.tokenizer is not None:
            tokenizer = str(Path(out_dir) / manifest.tokenizer)
        fields = dict(
            checkpoint=manifest.checkpoint,
            seed=manifest.seed,
            qmode=q.qmode,
            group_size=q.group_size,
            embedding_bits=q.embedding_bits,
            embedding_group_size=q.embedding_group_size,
            qparams=q.qparams,
            output_bits=q.output_bits,
            output_qmode=q.output_qmode,
            gptq=q.gptq,
            upgrade=q.upgrade,
            upgrade_qmode=q.upgrade_qmode,
            calibration=q.calibration,
            recipe=q.recipe,
            tokenizer=tokenizer,
            dtype=manifest.dtype,
            fuse=manifest.fuse,
            sdpa=manifest.sdpa,
            logits=manifest.logits,
        )
        return cls(**{**fields, **overrides})


@dataclass(frozen=True)
class AdapterSpec:
    """``--lora [NAME=]DIR[:scale=S]``: where an adapter lives, what its program is called, and
    the factor on its contribution (llama.cpp's ``--lora-scaled``)."""

    name: str
    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        body, sep, scale_text = text.rpartition(":scale=")
        if not sep:
            body, scale_text = text, ""
        scale = 1.0
        if scale_text:
            try:
                scale = float(scale_text)
            except ValueError:
                raise ConfigError(
                    f"--lora {text!r}: scale {scale_text!r} is not a number"
                ) from None
            if not math.isfinite(scale):
                raise ConfigError(f"--lora {text!r}: scale must be finite")
        name, sep, path = body.partition("=")
        if not sep:
            path, name = body, Path(body.rstrip("/")).name
        if not path:
            raise ConfigError(f"--lora {text!r}: expected [NAME=]DIR[:scale=S]")
        return cls(name, Path(path), scale)


def config_default(name: str):
    """The default of ``ExportConfig``'s field ``name`` (what ``export_llama``'s flag defaults
    to)."""
    (f,) = (f for f in fields(ExportConfig) if f.name == name)
    return f.default


def parse_switchable_slots(text: str) -> tuple[tuple[str, ...], int]:
    """``--switchable-slots TARGETS:RANK``: ``all:32``, or ``q_proj,v_proj:16``."""
    targets, sep, rank = text.rpartition(":")
    try:
        value = int(rank)
    except ValueError:
        value = 0
    if not sep or not targets or value <= 0:
        raise ConfigError(
            f"--switchable-slots {text!r}: expected TARGETS:RANK, e.g. all:32 or q_proj,v_proj:16"
        )
    return tuple(t.strip() for t in targets.split(",")), value


@dataclass(frozen=True)
class ExportConfig:
    model_args: ModelArgs
    output_dir: Path
    checkpoint: Path | None = None
    adapters: tuple[AdapterSpec, ...] = field(default_factory=tuple)
    # Quantization: a preset of quant/recipe.py (the one set of defaults), and fields that
    # override it (None: the recipe's). resolved_recipe is the result.
    recipe: str = DEFAULT_RECIPE
    calibration: Path | None = None  # calibration text (None: the built-in prose)
    qmode: str | None = None
    group_size: int | None = None
    embedding_bits: int | None = None
    embedding_group_size: int | None = None
    qparams: str | None = None
    output_bits: int | None = None  # 8: the output layer 8da8w; 0: as the other linears
    seed: int = DEFAULT_SEED
    overwrite: bool = False
    merge: str | None = None  # name of the adapter folded into the base weights
    dtype: str = DEFAULT_DTYPE
    fuse: str = DEFAULT_FUSE  # which projections run as one fused matmul
    sdpa: str = DEFAULT_SDPA  # attention kernels: ExecuTorch's custom ops, or plain PyTorch ops
    logits: str = DEFAULT_LOGITS  # forward's logits: every position, or the last one only
    bundle: bool = False  # also write bundle.pte: base + every adapter as methods of one program
    switchable: bool = False  # also write switchable.pte: adapter weights as run-time inputs
    # switchable.pte's slots also fit (projections, rank) for adapters added later
    switchable_slots: tuple[tuple[str, ...], int] | None = None
    # also write template.pte (switchable.pte's slots as constants): --add-to makes NAME.pte
    # from it without lowering
    adapter_template: bool = False
    # dtype of switchable.pte's adapter inputs (NAME.lora.safetensors); None: the compute dtype
    adapter_dtype: str | None = None
    bos_id: int = 1  # what the runner prepends (from the checkpoint, or --bos-id)
    eos_ids: tuple[int, ...] = (2,)  # every id that ends generation
    tokenizer_files: tuple[Path, ...] = ()  # copied into the export (tokenizer.json first)
    # the chat template the export carries as chat_template.jinja, and where it came from
    chat_template: str | None = None
    chat_template_source: str | None = None
    # the recipe with the fields above applied (set in __post_init__)
    resolved_recipe: Recipe | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given_group = self._resolve_recipe()
        if self.qmode not in QMODES:
            raise ConfigError(f"qmode must be one of {QMODES}, got {self.qmode!r}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0, got {self.group_size}")
        grouped = self.qmode == "8da4w" or self.resolved_recipe.output_qmode == "8da4w"
        if grouped and self.group_size % 32:
            raise ConfigError(
                f"group_size {self.group_size} is not supported by XNNPACK's groupwise kernels: "
                "use 0 (per channel) or a multiple of 32"
            )
        if grouped and self.group_size:
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
        if self.qparams not in QPARAMS:
            raise ConfigError(f"qparams must be one of {QPARAMS}, got {self.qparams!r}")
        if self.output_bits not in OUTPUT_BITS:
            raise ConfigError(f"output_bits must be one of {OUTPUT_BITS}, got {self.output_bits}")
        if self.output_bits and self.qmode == "none":
            raise ConfigError("output_bits 8 quantizes the output layer: it needs a qmode")
        if self.qmode == "8da8w" and given_group:
            raise ConfigError(
                f"--qmode 8da8w with --group-size {self.group_size}: XNNPACK has no grouped int8 "
                "kernel (int8 weights take one scale per output channel); use --group-size 0"
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
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.fuse not in FUSE_MODES:
            raise ConfigError(f"fuse must be one of {FUSE_MODES}, got {self.fuse!r}")
        if self.sdpa not in SDPA_MODES:
            raise ConfigError(f"sdpa must be one of {SDPA_MODES}, got {self.sdpa!r}")
        if self.logits not in LOGITS_MODES:
            raise ConfigError(f"logits must be one of {LOGITS_MODES}, got {self.logits!r}")
        args = self.model_args
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
        if self.dtype == "bf16":
            # Measured with executorch 1.5.1: XNNPACK delegates no bf16 linear (8da4w fails to
            # lower; fp32 weights stay in the .pte on portable kernels, outside the foundation).
            raise ConfigError(
                "--dtype bf16 is not supported: XNNPACK in executorch 1.5.1 does not delegate "
                "bf16 linears; use fp32 (the default; bf16 checkpoints are upcast) or fp16"
            )
        vocab = self.model_args.vocab_size
        bad = [
            t for t in (self.bos_id, *self.eos_ids) if not (isinstance(t, int) and 0 <= t < vocab)
        ]
        if bad or not self.eos_ids:
            raise ConfigError(
                f"special token ids must be in [0, {vocab}) and eos_ids not empty: bos_id "
                f"{self.bos_id}, eos_ids {list(self.eos_ids)}"
            )
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(
                f"adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}"
            )
        if self.adapter_template and not self.switchable:
            raise ConfigError(
                "--adapter-template writes a program with switchable.pte's slots: add --switchable"
            )
        if self.adapter_template and self.dtype != "fp32":
            raise ConfigError(
                f"--adapter-template with --dtype {self.dtype}: the template needs its adapter "
                "weights inside XNNPACK's delegate, which takes fp32 linears here; use --dtype fp32"
            )
        if self.switchable_slots is not None:
            targets, rank = self.switchable_slots
            if not self.switchable:
                raise ConfigError(
                    "--switchable-slots reserves room in switchable.pte: add --switchable"
                )
            if not targets or rank <= 0:
                raise ConfigError(
                    f"--switchable-slots: expected TARGETS:RANK with RANK > 0, got {targets}:{rank}"
                )
        if self.merge is not None:
            if self.merge not in names:
                raise ConfigError(
                    f"--merge {self.merge!r}: no --lora adapter of that name (have: {names})"
                )
            if len(names) > 1:
                raise ConfigError(
                    f"--merge {self.merge!r} with other adapters {sorted(set(names) - {self.merge})}:"
                    " they were trained against the unmerged base; export them separately"
                )

    def _resolve_recipe(self) -> bool:
        """Fill the quantization fields left None from the recipe and keep the result in
        ``resolved_recipe``; returns whether a (non-zero) group size was asked for."""
        base = preset(self.recipe)
        given_group = bool(self.group_size)  # a group size asked for (not the recipe's)
        overrides = dict(
            qmode=self.qmode,
            group_size=self.group_size,
            qparams=self.qparams,
            embedding_bits=self.embedding_bits,
            embedding_group_size=self.embedding_group_size,
        )
        if self.qmode is not None and self.qmode != base.qmode:
            # another precision for the linears: the output follows them unless told, and the
            # 4-bit-only steps (GPTQ) and the measured upgrades do not apply
            overrides.update(output_qmode=self.qmode, gptq=False, upgrade=0.0)
            if self.qmode == "none":
                overrides.update(embedding_bits=self.embedding_bits or 0)
        if self.output_bits == 8:
            overrides["output_qmode"] = "8da8w"
        elif self.output_bits == 0:
            overrides["output_qmode"] = overrides.get("qmode") or base.qmode
        if (self.qmode or base.qmode) == "8da8w" and self.group_size is None:
            overrides["group_size"] = 0
        recipe = base.with_overrides(**overrides)
        object.__setattr__(self, "resolved_recipe", recipe)
        for name in ("qmode", "group_size", "qparams", "embedding_bits", "embedding_group_size"):
            object.__setattr__(self, name, getattr(recipe, name))
        object.__setattr__(
            self, "output_bits", 8 if recipe.output_qmode == "8da8w" != recipe.qmode else 0
        )
        if self.calibration is not None and not recipe.calibrated:
            raise ConfigError(
                f"--calibration: recipe {recipe.name} does not calibrate (one that does: q4_k_m)"
            )
        return given_group

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def adapter_torch_dtype(self) -> torch.dtype:
        """The dtype of the switchable program's adapter inputs."""
        return (
            self.torch_dtype if self.adapter_dtype is None else ADAPTER_DTYPES[self.adapter_dtype]
        )

    @property
    def foundation(self) -> FoundationSpec:
        r = self.resolved_recipe
        tokenizer = next(
            (str(p) for p in self.tokenizer_files if p.name == "tokenizer.json"),
            next((str(p) for p in self.tokenizer_files if p.suffix == ".json"
                  and p.name != "tokenizer_config.json"), None),
        )  # fmt: skip
        return FoundationSpec(
            output_qmode=r.output_qmode,
            gptq=r.gptq,
            upgrade=r.upgrade,
            upgrade_qmode=r.upgrade_qmode,
            calibration=None if self.calibration is None else os.path.realpath(self.calibration),
            tokenizer=tokenizer if r.calibrated else None,
            recipe=r.name,
            checkpoint=self.checkpoint,
            seed=self.seed,
            qmode=self.qmode,
            group_size=self.group_size,
            embedding_bits=self.embedding_bits,
            embedding_group_size=self.embedding_group_size,
            qparams=self.qparams,
            output_bits=self.output_bits,
            dtype=self.dtype,
            fuse=self.fuse,
            sdpa=self.sdpa,
            logits=self.logits,
        )
