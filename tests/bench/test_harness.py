"""bench/run.py end to end on the tiny config: one export variant, no ExecuTorch baseline (the
full run with it is a benchmark, not a test); every figure must be present, positive and
finite, and the table and plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_harness_on_tiny_config(tmp_path):
    cmd = [
        sys.executable,
        str(HARNESS),
        "--config",
        "tiny",
        "--variants",
        "split",
        "--no-baseline",
        "--rounds",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "results"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = tmp_path / "results"
    figures = json.loads((res / "tiny.json").read_text())
    assert set(figures["median"]) == {
        "ours-split/base",
        "ours-split/lora",
        "eager-fp32",
        "eager-8da4w",
    }
    for row in figures["median"].values():
        assert set(row) == {"prefill_tokens_per_s", "time_to_first_token_ms", "decode_ms_per_token"}
    export = figures["exports"]["ours-split"]
    assert {"wall_s", "peak_rss_mib", "stages_s", "adapter_export_s", "files"} <= set(export)
    assert set(export["files"]) >= {"base.pte", "a0.pte", "foundation.ptd", "manifest.json"}
    bound = figures["bound"]["ours-split"]
    assert set(bound) == {
        "weight_bytes_per_token",
        "decode_bound_ms",
        "base_over_bound",
        "gemm_4bit_ms",
        "gemm_4bit_over_bound",
    }
    prof = figures["profile"]["ours-split/base"]
    assert prof["delegate_calls"] > 0 and prof["step_ms"] >= prof["delegate_ms"] > 0
    assert set(figures["ratios"]["ours-split"]) == {"lora_over_base_decode"}
    numbers = list(_numbers(figures))
    assert len(numbers) > 30
    # stage times are printed to 10 ms, so a quick stage reads 0.00; ETDump times have 1 us
    # resolution, so the tiny model's 64-wide GEMMs may read 0
    may_be_zero = (".stages_s.", "gemm_4bit")
    bad = [
        (p, v)
        for p, v in numbers
        if not (math.isfinite(v) and (v > 0 or (any(z in p for z in may_be_zero) and v == 0)))
    ]
    assert not bad, bad
    table = (res / "tiny.md").read_text()
    assert "| ours-split/base |" in table
    # bytes for k adapters: the base export plus k copies of the adapter program
    files = export["files"]
    k4 = (files["foundation.ptd"] + files["base.pte"] + 4 * files["a0.pte"]) / 1e6
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| MB on device"))
    assert lines[at] == "| MB on device, base + k adapters | k=1 | k=2 | k=4 | k=8 |"
    assert lines[at + 2].split(" | ")[3] == f"{k4:.2f}"
    for png in ("tiny-decode.png", "tiny-sizes.png"):
        assert (res / png).read_bytes()[:4] == b"\x89PNG"
    # --render re-writes the table from the JSON alone
    (res / "tiny.md").unlink()
    cmd = [sys.executable, str(HARNESS), "--render", str(res / "tiny.json")]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    assert (res / "tiny.md").read_text() == table
