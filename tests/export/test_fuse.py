"""export_llama --fuse: fused programs (with a packed adapter) match the split export.

Both exports are 8da4w g32 with the int4 embedding. Fusing concatenates weight rows, and the
int4 groups run along a row, so the quantized weights are the same numbers; the int8 dynamic
activation quantization sees the same input. Tolerance: runtime logits within 1e-3 absolute
of the split programs' (logits are O(1); XNNPACK blocks a wider GEMM differently, so fp32 sums
differ in order).
"""

import json

from edgelora.backends.xnnpack.lower import DERIVED_PREFIX
from edgelora.ci.output_match import match_export
from edgelora.format.layout import FOUNDATION_FILE
from edgelora.format.pte import read_ptd, read_pte
from edgelora.lora.attach import adapter_attached, adapter_fqns
from edgelora.lora.fusion import set_fusion
from edgelora.models.llama import build_model
from edgelora.runtime.program import LlamaProgram
from edgelora.weights.adapter_files import load_adapter

PROMPT = [1, 5, 9, 14, 3, 27, 8, 2]


def test_fused_export_with_adapter_matches_split_export(
    export_fused, adapter_dirs, export_8da4w, tiny_args
):
    out = export_fused
    assert json.loads((out / "manifest.json").read_text())["fuse"] == "all"
    for name in ("base", "chat"):
        fused = LlamaProgram(out / f"{name}.pte", out / FOUNDATION_FILE).forward(PROMPT, 0)
        split = LlamaProgram(export_8da4w / f"{name}.pte", export_8da4w / FOUNDATION_FILE)
        diff = (fused - split.forward(PROMPT, 0)).abs().max().item()
        assert diff < 1e-3, (name, diff)
    # The pass-made packed int4 embedding is in the foundation (named by content), so the
    # programs hold only the checksums and, for chat, its packed adapter matrices.
    ptd = read_ptd(out / FOUNDATION_FILE)
    assert any(k.startswith(DERIVED_PREFIX) for k in ptd)
    assert read_pte(out / "base.pte").constant_bytes <= 128
    chat = read_pte(out / "chat.pte")
    assert chat.needed <= set(ptd) and set(chat.inline).isdisjoint(ptd)
    model = build_model(tiny_args)
    set_fusion(model, "all")
    with adapter_attached(model, load_adapter(adapter_dirs["chat"], tiny_args, "chat")):
        fqns = adapter_fqns(model)
        packed = {n: p for n, p in model.named_parameters() if n in fqns}
    assert sum(chat.inline.values()) == sum(p.numel() * 4 for p in packed.values())
    results = match_export(out)  # eager fused model with the packed adapter, same tolerances
    assert all(r.ok for r in results), [r.line() for r in results]
