"""bench/run.py's reporting on a canned result: the committed stories15M run
(``bench/results/stories15m.json``) re-rendered with ``--render`` must give back its committed
table and every figure the README quotes -- positive and finite -- and the plots. (Running
the benchmark itself is a benchmark, not a test.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "bench" / "run.py"
CANNED = ROOT / "bench" / "results" / "stories15m.json"


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_render_reproduces_the_committed_table(tmp_path):
    res = tmp_path / "stories15m.json"
    shutil.copy(CANNED, res)
    cmd = [sys.executable, str(HARNESS), "--render", str(res)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = res.with_suffix(".md").read_text()
    assert table == CANNED.with_suffix(".md").read_text()
    figures = json.loads(res.read_text())
    variants = ("ours-split", "ours-fused", "executorch")
    assert set(figures["median"]) == {f"{v}/{p}" for v in variants for p in ("base", "lora")} | {
        "eager-fp32",
        "eager-8da4w",
    }
    for row in figures["median"].values():
        assert set(row) == {"prefill_tokens_per_s", "time_to_first_token_ms", "decode_ms_per_token"}
    for name in ("ours-split", "ours-fused"):
        export = figures["exports"][name]
        assert {"wall_s", "peak_rss_mib", "stages_s", "adapter_export_s", "files"} <= set(export)
        assert {"base.pte", "a0.pte", "foundation.ptd", "manifest.json"} <= set(export["files"])
        bound = figures["bound"][name]
        assert bound["decode_bound_ms"] > 0
        want = bound["weight_bytes_per_token"] / (figures["bandwidth"]["read_gb_per_s"] * 1e9)
        assert math.isclose(bound["decode_bound_ms"], want * 1e3, rel_tol=1e-9)
        median = figures["median"][f"{name}/base"]["decode_ms_per_token"]
        assert math.isclose(bound["base_over_bound"], median / bound["decode_bound_ms"])
    bad = [(p, v) for p, v in _numbers(figures) if not (math.isfinite(v) and v >= 0)]
    assert not bad, bad
    # bytes for k adapters: the base export plus k copies of the adapter program
    files = figures["exports"]["ours-split"]["files"]
    k4 = (files["foundation.ptd"] + files["base.pte"] + 4 * files["a0.pte"]) / 1e6
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| MB on device"))
    assert lines[at] == "| MB on device, base + k adapters | k=1 | k=2 | k=4 | k=8 |"
    assert lines[at + 2].split(" | ")[3] == f"{k4:.2f}"
    for png in ("stories15m-decode.png", "stories15m-sizes.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
