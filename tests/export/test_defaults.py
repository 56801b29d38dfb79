"""One set of defaults: the foundation's settings have theirs in ``FoundationSpec`` alone.
``export_llama`` with no quantization or output flags builds the same ``ExportConfig`` as the
Python API given only the model and the output directory; each flag's default is the spec's;
a manifest maps back onto the spec it was written from (issue 33: ``qparams`` was ``hqq`` in the
CLI but ``affine`` in the API, ``sdpa`` ``custom`` in one and ``plain`` in the other)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from edgelora.errors import ConfigError
from edgelora.export.cli import build_parser, config_from_args
from edgelora.export.config import ExportConfig, FoundationSpec
from edgelora.export.spec import spec_default
from edgelora.models.args import ModelArgs
from edgelora.quant.recipe import DEFAULT_RECIPE, preset

PARAMS = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 96, "max_seq_len": 32}


def _cli(tmp_path, *flags):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    argv = ["--params", str(tmp_path / "params.json"), "--output-dir", "o", *flags]
    return config_from_args(build_parser().parse_args(argv), ModelArgs.from_dict(PARAMS))


def test_cli_defaults_are_the_api_defaults(tmp_path):
    cli = _cli(tmp_path)
    api = ExportConfig(model_args=ModelArgs.from_dict(PARAMS), output_dir=Path("o"))
    differ = {
        f.name: (getattr(cli, f.name), getattr(api, f.name))
        for f in fields(ExportConfig)
        if getattr(cli, f.name) != getattr(api, f.name)
    }
    assert not differ, differ
    assert cli.foundation == api.foundation == FoundationSpec()
    assert api.foundation.recipe == preset(DEFAULT_RECIPE)


def test_every_flag_defaults_to_the_spec():
    parser = build_parser()
    for f in fields(FoundationSpec):
        if f.name in ("checkpoint", "tokenizer", "calibration"):
            assert parser.get_default(f.name) is None, f.name  # nothing, unless given
            continue
        want = spec_default(f.name)
        assert parser.get_default(f.name) == want, f.name
    assert spec_default("recipe") == DEFAULT_RECIPE
    for flag in ("qmode", "group_size", "qparams", "embedding_bits", "output_bits"):
        assert parser.get_default(flag) is None, flag  # None: the recipe's


def test_flags_map_onto_the_spec_and_the_manifest_maps_back(tmp_path):
    """What the CLI makes of its flags is what a manifest written from it reads back as, and
    what ``edgelora-add`` compares a flag given again with."""
    from edgelora.format.manifest import Manifest

    cli = _cli(tmp_path, "--recipe", "q4_0", "--group-size", "64", "--dtype", "fp16",
               "--fuse", "qkv", "--sdpa", "plain", "--seed", "7")  # fmt: skip
    spec = cli.foundation
    assert (spec.recipe.name, spec.group_size, spec.dtype, spec.seed) == (
        "q4_0 (group_size=64)",
        64,
        "fp16",
        7,
    )
    manifest = Manifest(
        model=ModelArgs.from_dict(PARAMS).to_dict(),
        quantization=spec.quantization_entry(),
        programs={},
        files={},
        **spec.manifest_settings(),
    )
    assert FoundationSpec.of_export(manifest) == spec
    flags = spec.flags()
    assert flags["group_size"] == 64 and flags["dtype"] == "fp16" and flags["fuse"] == "qkv"


def test_the_spec_is_validated_when_made():
    for bad, match in (
        (dict(dtype="fp64"), "dtype must be one of"),
        (dict(dtype="bf16"), "bf16 is not supported"),
        (dict(sdpa="flash"), "sdpa must be one of"),
        (dict(seed="1"), "seed must be an integer"),
        (dict(recipe="q4_0"), "must be a Recipe"),
    ):
        with pytest.raises(ConfigError, match=match):
            FoundationSpec(**bad)
    with pytest.raises(ConfigError, match="multiple of 32"):
        FoundationSpec.resolve("q4_0", group_size=48)
    with pytest.raises(ConfigError, match="no grouped int8"):
        FoundationSpec.resolve(qmode="8da8w", group_size=32)


def test_help_states_the_defaults_the_parser_uses():
    text = " ".join(build_parser().format_help().split())
    for flag in ("dtype", "sdpa", "logits", "recipe"):
        value = spec_default(flag)
        assert build_parser().get_default(flag) == value
        assert f"(default {value}" in text, flag
