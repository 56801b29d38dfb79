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

from ..hf_fixtures import MLA_TARGETS, PROMPT, make_deepseek, peft_adapter, program_logits

RUNTIME_ATOL = 1e-4


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsexp")
    # Latent ranks of 32 and v_head_dim 16 so 8da4w (group 32) quantizes wq_b, wkv_b, wo too.
    hf = make_deepseek(
        seed=4,
        num_hidden_layers=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        v_head_dim=16,
        kv_lora_rank=32,
        max_position_embeddings=32,
    )
    hf.save_pretrained(root / "ds")
    lora = peft_adapter(hf, root / "lora", seed=5, r=4, lora_alpha=8, target_modules=MLA_TARGETS)
    with torch.no_grad():
        refs = {"base": hf(PROMPT).logits[0], "lora": lora(PROMPT).logits[0]}
    return root, refs


def test_fused_fp32_export_matches_transformers_and_peft(deepseek, tmp_path, capsys):
    root, refs = deepseek
    out = tmp_path / "fused"
    argv = ["--checkpoint", str(root / "ds"), "--qmode", "none", "--fuse", "mla"]
    assert main(argv + ["--output-dir", str(out), "--lora", f"lora={root / 'lora'}"]) == 0
    assert "DeepSeek-V3" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fuse"] == "mla" and manifest["model"]["attention_type"] == "mla"
    for name in ("base", "lora"):
        diff = (program_logits(out, name) - refs[name]).abs().max().item()
        assert diff < RUNTIME_ATOL, (name, diff)
    assert (refs["lora"] - refs["base"]).abs().max() > 100 * RUNTIME_ATOL
    results = match_export(out)
    assert all(r.ok for r in results), [r.line() for r in results]


def test_split_8da4w_export_output_matches(deepseek, tmp_path):
    root, _ = deepseek
    out = tmp_path / "split"
    argv = ["--checkpoint", str(root / "ds"), "--output-dir", str(out)]
    assert main(argv + ["--lora", f"lora={root / 'lora'}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fuse"] == "none" and manifest["quantization"]["float_linears"] == {}
    results = match_export(out)
    assert all(r.ok for r in results), [r.line() for r in results]
    assert [r.name for r in results] == ["base", "lora"]


def test_fuse_mode_must_fit_the_attention(deepseek, tmp_path, capsys):
    root, _ = deepseek
    argv = ["--checkpoint", str(root / "ds"), "--output-dir", str(tmp_path / "x")]
    assert main(argv + ["--fuse", "qkv"]) != 0
    assert "has no wq/wk/wv" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
