"""Every preset of --recipe on the trained tiny model: its programs output-match their eager
model (ci/output_match: the export rebuilt from its manifest, calibration included), and the
manifest records each linear's precision and error; calibration is deterministic."""

import json

import pytest
import torch

from edgelora.ci.output_match import match_export
from edgelora.export.cli import resolve_model_args
from edgelora.export.config import FoundationSpec
from edgelora.export.foundation import build_foundation
from edgelora.weights.checkpoint import open_checkpoint

# preset -> the shared export made with it (q4_k_s takes q4_k_m's steps with another share)
PRESET_EXPORTS = {"q4_0": "8da4w_base_only", "q8_0": "trained_q8_0", "default": "trained_default"}


@pytest.mark.parametrize(
    "preset",
    [pytest.param(p, marks=pytest.mark.uses_exports(e)) for p, e in PRESET_EXPORTS.items()],
)
def test_preset_programs_match_their_eager_model(preset, request):
    out = request.getfixturevalue(f"export_{PRESET_EXPORTS[preset]}")
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["recipe"] == ("q4_k_m" if preset == "default" else preset)
    # every linear's precision and relative weight error is recorded
    assert q["tensors"] and all(m in ("8da4w", "8da8w", "8w") for m, _ in q["tensors"].values())
    assert q["tensors"]["output"][0] == ("8da4w" if preset == "q4_0" else "8w")
    if preset == "default":
        modes = [m for f, (m, _) in q["tensors"].items() if f != "output"]
        assert "8w" in modes and "8da4w" in modes  # the measured upgrades, and GPTQ's 4-bit
        assert set(q["sensitivity"]) and q["calibration_sha256"]
    results = match_export(out)
    assert results and all(r.ok for r in results), results


def test_calibration_is_deterministic(trained_tiny):
    """Same model, text and recipe: bit-identical quantized weights (GPTQ and the plan)."""
    checkpoint = open_checkpoint(trained_tiny / "model")
    args = resolve_model_args(None, checkpoint, None)
    spec = FoundationSpec.by_hand(
        "q4_k_m",
        checkpoint=trained_tiny / "model",
        qmode="8da4w",
        group_size=32,
        output_qmode="8w",
        gptq=True,
        upgrade=1 / 3,
        embedding_bits=8,
        tokenizer=str(trained_tiny / "model" / "tokenizer.json"),
    )
    runs = []
    for _ in range(2):
        model, report, _ = build_foundation(args, spec)
        runs.append((model.state_dict(), report.tensors, report.sensitivity))
    (a, ta, sa), (b, tb, sb) = runs
    assert ta == tb and sa == sb and any(m == "8w" for m, _ in ta.values())
    for name, value in a.items():
        other = b[name]
        if hasattr(value, "qdata"):
            assert torch.equal(value.qdata, other.qdata) and torch.equal(value.scale, other.scale)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), name
