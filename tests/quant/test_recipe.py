"""Recipes (quant/recipe.py) and calibration (quant/calibrate.py): one set of defaults for the
CLI and the Python API, the measured upgrade plan, and the flag matrix refused before work."""

import itertools

import pytest
import torch

from edgelora.errors import ConfigError
from edgelora.export.cli import build_parser, config_from_args
from edgelora.export.config import ExportConfig, FoundationSpec
from edgelora.models.llama import build_model
from edgelora.quant.calibrate import Calibration, random_calibration, sensitivity, upgrade_plan
from edgelora.quant.recipe import DEFAULT_RECIPE, PRESETS, preset


def test_cli_and_python_api_share_the_default_recipe(tiny_args, tmp_path):
    api = ExportConfig(model_args=tiny_args, output_dir=tmp_path / "o")
    ns = build_parser().parse_args(["--output-dir", str(tmp_path / "o")])
    cli = config_from_args(ns, tiny_args)
    assert api.foundation.recipe == cli.foundation.recipe == PRESETS[DEFAULT_RECIPE]
    assert api.foundation == cli.foundation


def test_flags_beside_a_recipe_override_it(tiny_args, tmp_path):
    c = FoundationSpec.resolve("q4_k_m", group_size=64)
    assert c.group_size == 64 and c.recipe.gptq and "group_size=64" in c.recipe.name
    c = FoundationSpec.resolve("q4_k_m", qmode="none")
    assert c.output == "none" and not c.calibrated
    with pytest.raises(ConfigError, match="unknown recipe 'q5'"):
        preset("q5")
    with pytest.raises(ConfigError, match="does not calibrate"):
        FoundationSpec.resolve("q8_0", calibration=str(tmp_path))


def test_upgrade_plan_takes_divergence_per_byte_up_to_the_share():
    sizes = {"a": 100, "b": 100, "c": 400, "d": 400}
    kld = {"a": 1.0, "b": 0.1, "c": 2.0, "d": 0.05}  # per weight: a 0.01, c 0.005, b 0.001
    assert upgrade_plan(kld, sizes, 0.1) == ["a"]
    assert upgrade_plan(kld, sizes, 0.5) == ["a", "c"]
    assert upgrade_plan(kld, sizes, 0.0) == []
    assert upgrade_plan(kld, sizes, 1.0) == ["a", "c", "b", "d"]


def test_sensitivity_skipping_earlier_layers_equals_the_full_forward(tiny_args):
    """A linear in layer 1 measured from layer 1's recorded input equals the full model's
    divergence (1e-6 relative: the same float ops on the same inputs, only the unchanged
    earlier layers skipped); a zeroed linear diverges more than a slightly perturbed one."""
    from edgelora.models.args import ModelArgs

    args = ModelArgs.from_dict({**tiny_args.to_dict(), "n_layers": 2})
    model = build_model(args, seed=0)
    cal = random_calibration(args.vocab_size, chunk=24, max_tokens=48)
    fqn = "layers.1.feed_forward.w2"
    w = model.get_submodule(fqn).weight.detach()
    noisy = w + 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    got = sensitivity(model, cal, {fqn: noisy, "layers.1.attention.wo": torch.zeros_like(
        model.get_submodule("layers.1.attention.wo").weight)})  # fmt: skip
    # the same divergence with no layer skipped: measure the linear as a top-level one
    full = sensitivity(_Renamed(model), Calibration("t", "", cal.chunks), {"m." + fqn: noisy})[
        "m." + fqn
    ]
    assert got[fqn] == pytest.approx(full, rel=1e-6)
    assert got["layers.1.attention.wo"] > got[fqn] > 0


class _Renamed(torch.nn.Module):
    """The model under another name: its linears are not ``layers.N.*`` any more, so
    sensitivity runs every layer."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, tokens, input_pos):
        return self.m(tokens, input_pos)


# The flag matrix: every value of each quantization-related flag. A combination is either
# accepted (and lowers: tests/export/test_recipes_export.py lowers each preset) or refused by
# ExportConfig before any stage, as a ConfigError naming a flag -- never another exception.
MATRIX = {
    "--recipe": [None, *sorted(PRESETS)],
    "--qmode": [None, "none", "8da4w", "8da8w", "8w"],
    "--group-size": [None, "0", "32", "48", "64"],
    "--dtype": [None, "fp16"],
    "--adapter-dtype": [None, "fp16", "int8"],
    "--embedding-bits": [None, "0", "4", "8"],
}
# Known not to lower with XNNPACK in ExecuTorch 1.5.1 (and so refused):
REFUSED = [
    ({"--qmode": "8da8w", "--group-size": "32"}, "8da8w.*group-size"),
    ({"--qmode": "8da4w", "--group-size": "48"}, "multiple of 32"),
]


def test_flag_matrix_is_accepted_or_refused_by_name(tiny_args, tmp_path):
    parser = build_parser()
    refused = 0
    for values in itertools.product(*MATRIX.values()):
        argv = ["--output-dir", str(tmp_path / "o")]
        for flag, value in zip(MATRIX, values, strict=True):
            if value is not None:
                argv += [flag, value]
        ns = parser.parse_args(argv)
        try:
            config = config_from_args(ns, tiny_args)
        except ConfigError as e:
            text = str(e)
            assert "\n" not in text and "--" in text or "group_size" in text, text
            refused += 1
            continue
        spec = config.foundation
        assert spec.qmode in ("none", "8da4w", "8da8w", "8w")
        if spec.qmode == "8da8w" or spec.output == "8da8w":
            assert not (values[2] not in (None, "0") and spec.qmode == "8da8w"), argv
    assert refused > 0
    for flags, match in REFUSED:
        argv = ["--output-dir", str(tmp_path / "o")] + [x for kv in flags.items() for x in kv]
        with pytest.raises(ConfigError, match=match):
            config_from_args(parser.parse_args(argv), tiny_args)
