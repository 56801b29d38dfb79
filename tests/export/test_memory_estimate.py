"""The up-front memory estimate (export/memory.py) is an upper bound of the measured peak of
real exports: two sizes of bf16 Hugging Face checkpoints, each exported in its own process
(so ``VmHWM``, the process's peak resident memory, is the export's alone) with an adapter."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from ..hf_fixtures import ALL7, make_hf, peft_adapter

SIZES = {  # parameters: ~3M and ~37M (vocab-heavy, like the real models)
    "small": dict(hidden_size=128, intermediate_size=384, vocab_size=8192),
    "medium": dict(hidden_size=512, intermediate_size=1536, vocab_size=32000),
}
_PEAK = re.compile(r"so far (\d+) MiB\)")
_ESTIMATE = re.compile(r"estimated peak memory ([0-9.]+) GiB")


@pytest.mark.parametrize("size", SIZES)
def test_estimate_bounds_the_measured_peak(tmp_path, size):
    hf = make_hf(
        seed=1, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=128, **SIZES[size],
    )  # fmt: skip
    peft_adapter(hf, tmp_path / "ad", r=8, lora_alpha=16, target_modules=ALL7)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    run = subprocess.run(
        [sys.executable, "-m", "edgelora.export.cli", "--checkpoint", str(tmp_path / "hf"),
         "--lora", f"a={tmp_path / 'ad'}", "--max-seq-len", "128",
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    measured = max(int(m) for m in _PEAK.findall(run.stdout)) / 1024
    (estimate,) = (float(m) for m in _ESTIMATE.findall(run.stdout))
    # An upper bound, and not a vacuous one (the fixed overhead dominates at these sizes).
    assert measured <= estimate <= 2 * measured, (measured, estimate)
