"""One set of defaults: ``export_llama`` with no quantization or output flags builds the same
``ExportConfig`` as the Python API given only the model and the output directory, and a
``FoundationSpec`` built by hand defaults to what both hand it (issue 33: ``qparams`` was ``hqq``
in the CLI but ``affine`` in the API, ``sdpa`` ``custom`` in one and ``plain`` in the other)."""

from __future__ import annotations

import json
from dataclasses import fields

from edgelora.export.cli import build_parser, config_from_args
from edgelora.export.config import ExportConfig, FoundationSpec
from edgelora.models.args import ModelArgs
from edgelora.quant.recipe import DEFAULT_RECIPE, Recipe, preset

PARAMS = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 96, "max_seq_len": 32}


def test_cli_defaults_are_the_api_defaults(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    args = ModelArgs.from_dict(PARAMS)
    ns = build_parser().parse_args(["--params", str(tmp_path / "params.json"), "--output-dir", "o"])
    cli = config_from_args(ns, args)
    api = ExportConfig(model_args=args, output_dir=ns.output_dir)
    differ = {
        f.name: (getattr(cli, f.name), getattr(api, f.name))
        for f in fields(ExportConfig)
        if getattr(cli, f.name) != getattr(api, f.name)
    }
    assert not differ, differ
    assert cli.foundation == api.foundation
    assert cli.resolved_recipe == api.resolved_recipe == preset(DEFAULT_RECIPE)
    assert api.qparams == preset(DEFAULT_RECIPE).qparams  # (was "affine" in the API)


def test_foundation_spec_defaults_follow_the_config_and_the_recipe(tmp_path):
    spec, api = (
        FoundationSpec(),
        ExportConfig(model_args=ModelArgs.from_dict(PARAMS), output_dir=tmp_path),
    )
    for name in ("dtype", "fuse", "sdpa", "logits", "seed"):
        assert getattr(spec, name) == getattr(api, name), name
    recipe = Recipe("by-hand")  # a recipe's own field defaults: uncalibrated 8da4w
    for name in ("qmode", "group_size", "qparams", "embedding_bits", "embedding_group_size"):
        assert getattr(spec, name) == getattr(recipe, name), name
    assert not spec.calibrated


def test_help_states_the_defaults_the_parser_uses():
    text = build_parser().format_help()
    for flag, value in (("--dtype", "fp32"), ("--sdpa", "custom"), ("--logits", "all")):
        assert build_parser().get_default(flag[2:]) == value
        assert f"(default {value})" in " ".join(text.split()), flag
