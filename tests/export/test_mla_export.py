"""export_llama on a Hugging Face DeepSeek-V3 (dense MLA) directory with a PEFT adapter: fused
(``--fuse mla``, fp32) and split (8da4w) programs, base and adapter, on the ExecuTorch runtime.

Tolerances: the fp32 programs within 1e-4 absolute of transformers + PEFT (XNNPACK's fp32 GEMMs
sum in another order; logits are O(1)); the 8da4w programs against the eager quantized model by
``ci/output_match`` (its stated tolerance and greedy-token agreement).
"""

from __future__ import annotations

import json

import pytest
import torch

from edgelora.ci.output_match import match_export
from edgelora.export.cli import main

from ..hf_fixtures import RUNTIME_ATOL, program_logits


@pytest.fixture(scope="module")
def refs(hf_deepseek):
    return torch.load(hf_deepseek / "refs.pt")


def test_fused_fp32_export_matches_transformers_and_peft(export_mla_fused, refs):
    out = export_mla_fused
    assert "DeepSeek-V3" in (out.parent / "log.txt").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fuse"] == "mla" and manifest["model"]["attention_type"] == "mla"
    for name in ("base", "lora"):
        diff = (program_logits(out, name) - refs[name]).abs().max().item()
        assert diff < RUNTIME_ATOL, (name, diff)
    assert (refs["lora"] - refs["base"]).abs().max() > 100 * RUNTIME_ATOL
    results = match_export(out)
    assert all(r.ok for r in results), [r.line() for r in results]


def test_split_8da4w_export_output_matches(export_mla_8da4w):
    out = export_mla_8da4w
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fuse"] == "none" and manifest["quantization"]["float_linears"] == {}
    results = match_export(out)
    assert all(r.ok for r in results), [r.line() for r in results]
    assert [r.name for r in results] == ["base"]


def test_fuse_mode_must_fit_the_attention(hf_deepseek, tmp_path, capsys):
    root = hf_deepseek
    argv = ["--checkpoint", str(root / "ds"), "--output-dir", str(tmp_path / "x")]
    assert main(argv + ["--fuse", "qkv"]) != 0
    assert "has no wq/wk/wv" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
