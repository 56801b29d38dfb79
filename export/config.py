"""``ExportConfig``: everything one ``export_llama`` run needs, validated once.

The foundation's settings (recipe, dtype, attention kernels, ...) are one nested, validated
:class:`~edgelora.export.spec.FoundationSpec`, which holds their only defaults; the fields here
are what an export makes of it: which adapters, which programs, which tokens end generation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from edgelora.errors import ConfigError
from edgelora.export.spec import DTYPES, FoundationSpec
from edgelora.format.adapter_inputs import ADAPTER_DTYPES
from edgelora.models.args import ModelArgs

__all__ = ["DTYPES", "AdapterSpec", "ExportConfig", "FoundationSpec"]


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
    # the foundation every program shares: its checkpoint, recipe, dtype, kernels (validated;
    # the settings' defaults are there)
    foundation: FoundationSpec = field(default_factory=FoundationSpec)
    adapters: tuple[AdapterSpec, ...] = field(default_factory=tuple)
    overwrite: bool = False
    merge: str | None = None  # name of the adapter folded into the base weights
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

    def __post_init__(self) -> None:
        spec = self.foundation
        if not isinstance(spec, FoundationSpec):
            raise ConfigError(f"foundation must be a FoundationSpec, got {spec!r:.80}")
        spec.check_model(self.model_args)
        if spec.calibrated and spec.tokenizer is None:
            # calibration text is encoded with the tokenizer the export ships
            tokenizer = next(
                (str(p) for p in self.tokenizer_files if p.name == "tokenizer.json"),
                next((str(p) for p in self.tokenizer_files if p.suffix == ".json"
                      and p.name != "tokenizer_config.json"), None),
            )  # fmt: skip
            spec = replace(spec, tokenizer=tokenizer)
        if spec.calibration is not None:
            spec = replace(spec, calibration=os.path.realpath(spec.calibration))
        object.__setattr__(self, "foundation", spec)
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"adapter names must be unique, repeated: {dupes}")
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
        if self.adapter_template and spec.dtype != "fp32":
            raise ConfigError(
                f"--adapter-template with --dtype {spec.dtype}: the template needs its adapter "
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

    @property
    def checkpoint(self) -> Path | None:
        c = self.foundation.checkpoint
        return None if c is None else Path(c)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.foundation.torch_dtype

    @property
    def adapter_torch_dtype(self) -> torch.dtype:
        """The dtype of the switchable program's adapter inputs."""
        return (
            self.torch_dtype if self.adapter_dtype is None else ADAPTER_DTYPES[self.adapter_dtype]
        )
