"""export_llama --fuse: fused programs (with a packed adapter) match the split export.

Tolerance: fp32 runtime logits within 1e-4 absolute of the split programs' (the same math;
XNNPACK blocks a wider GEMM differently; logits are O(1)).
"""

import json

from edgelora.ci.output_match import match_export
from edgelora.export.cli import main
from edgelora.export.output import FOUNDATION_FILE
from edgelora.runtime.session import LlamaProgram

PROMPT = [1, 5, 9, 14, 3, 27, 8, 2]


def test_fused_export_with_adapter_matches_split_export(
    tmp_path, params_file, adapter_dirs, export_fp32
):
    out = tmp_path / "fused"
    argv = ["--params", str(params_file), "--qmode", "none", "--fuse", "all"]
    argv += ["--lora", f"chat={adapter_dirs['chat']}", "--output-dir", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["fuse"] == "all"
    for name in ("base", "chat"):
        fused = LlamaProgram(out / f"{name}.pte", out / FOUNDATION_FILE).forward(PROMPT, 0)
        split = LlamaProgram(export_fp32 / f"{name}.pte", export_fp32 / FOUNDATION_FILE)
        diff = (fused - split.forward(PROMPT, 0)).abs().max().item()
        assert diff < 1e-4, (name, diff)
    results = match_export(out)  # eager fused model with the packed adapter, same tolerances
    assert all(r.ok for r in results), [r.line() for r in results]
