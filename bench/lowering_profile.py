"""Where one program's lowering time goes: cProfile of ``to_edge_transform_and_lower`` +
``to_executorch`` on a model of real layer shapes with few layers.

    python bench/lowering_profile.py [--shape llama-3.2-1b] [--layers 2] [--adapter]
                                     [--top 25] [--json OUT.json]

Builds our model with random weights (8da4w g32, custom SDPA, last-position logits, as an
export does), traces it, and lowers it once under cProfile, then prints the cumulative time of
the lowering's main phases (the edge passes, the partitioner, XNNPACK's ``preprocess`` per
partition and its pass pipeline, ``to_executorch``, serialisation), the number of partitions
and the profile's top functions. ``--adapter`` lowers an adapter program (rank 16, all seven
projections) instead of the base.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

from edgelora.bench.common import SHAPES  # noqa: E402

# Functions whose cumulative time is reported (substring of pstats' "file:line(function)").
PHASES = {
    "to_edge_transform_and_lower": "to_edge_transform_and_lower",
    "edge passes (whole graph)": "_gen_edge_manager_for_partitioners",
    "partitioner": "xnnpack_partitioner.py:.*\\(partition\\)|config_partitioner|partition\\)",
    "to_backend": "backend_api.py:.*\\(to_backend\\)",
    "XNNPACK preprocess (all partitions)": "xnnpack_preprocess.py:.*\\(preprocess\\)",
    "  its pass pipeline": "xnnpack_preprocess.py:.*|backends/xnnpack/_passes/__init__.py:.*\\(transform\\)",
    "  run_decompositions": "exported_program.py:.*\\(run_decompositions\\)",
    "  serialise to flatbuffer": "xnnpack_serializer|serialize_xnnpack_binary",
    "to_executorch": "\\(to_executorch\\)",
    "fake-tensor dispatch": "fake_tensor.py:.*\\(dispatch\\)",
    "fx Interpreter.run": "interpreter.py:.*\\(run\\)",
}


def profile_model(shape: str, layers: int, adapter: bool):
    from edgelora.export.config import FoundationSpec
    from edgelora.export.foundation import build_foundation
    from edgelora.models.args import ModelArgs
    from edgelora.quant.recipe import Recipe
    from edgelora.weights.synthetic import random_adapter

    s = SHAPES[shape]
    params = {
        "dim": s["hidden_size"], "n_layers": layers, "n_heads": s["num_attention_heads"],
        "n_kv_heads": s["num_key_value_heads"], "hidden_dim": s["intermediate_size"],
        "head_dim_override": s["head_dim"], "vocab_size": s["vocab_size"],
        "rope_theta": s["rope_theta"], "max_seq_len": 512, "qk_norm": s["family"] == "qwen3",
    }  # fmt: skip
    args = ModelArgs.from_dict(params)
    recipe = Recipe("8da4w g32")  # uncalibrated 8da4w, HQQ scales, float embedding
    spec = FoundationSpec(recipe=recipe, sdpa="custom", logits="last")
    model, _, _ = build_foundation(args, spec)
    ad = random_adapter(model, "a0", rank=16, alpha=32, seed=1) if adapter else None
    return model, args, ad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--adapter", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", type=Path)
    p.add_argument("--prof", type=Path, help="save the raw cProfile stats here")
    ns = p.parse_args()

    from edgelora.backends.xnnpack.lower import lower_to_xnnpack
    from edgelora.export.programs import trace
    from edgelora.lora.attach import adapter_attached, adapter_fqns

    model, args, adapter = profile_model(ns.shape, ns.layers, ns.adapter)
    with adapter_attached(model, adapter):
        t0 = time.perf_counter()
        ep = trace(model, args)
        trace_s = time.perf_counter() - t0
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        lowered = lower_to_xnnpack(ep, is_adapter=adapter_fqns(model).__contains__)
        buf = io.BytesIO()
        lowered.manager.write_to_file(buf)
        prof.disable()
        lower_s = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    if ns.prof:
        stats.dump_stats(ns.prof)
    import re

    phases = {}
    for label, pattern in PHASES.items():
        rx = re.compile(pattern)
        best = 0.0
        for (file, line, fn), (_, _, _, ct, _) in stats.stats.items():
            if rx.search(f"{file}:{line}({fn})"):
                best = max(best, ct)
        phases[label] = best
    calls = sum(
        st[0]
        for (file, _, fn), st in stats.stats.items()
        if fn == "preprocess" and "xnnpack" in file
    )
    print(f"{ns.shape} x {ns.layers} layers, {'adapter' if ns.adapter else 'base'} program: "
          f"trace {trace_s:.1f} s, lowering + serialise {lower_s:.1f} s under cProfile; "
          f"{calls} XNNPACK partitions")  # fmt: skip
    for label, s in phases.items():
        print(f"  {label:40s} {s:8.1f} s")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(ns.top)
    print(out.getvalue())
    if ns.json:
        ns.json.write_text(json.dumps({
            "shape": ns.shape, "layers": ns.layers, "adapter": ns.adapter, "trace_s": trace_s,
            "lower_s_profiled": lower_s, "partitions": calls, "phases_s": phases,
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
