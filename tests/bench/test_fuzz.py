"""The fuzzing smoke: ``bench/fuzz.py`` on every target for about 60 seconds in all (the long
campaign's results are ``bench/results/fuzz.json``). Every target must run -- executions
counted, coverage found -- with no crash, hang or unhandled error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "bench" / "fuzz.py"


def test_fuzz_smoke_every_target(tmp_path):
    sys.path.insert(0, str(FUZZ.parent))
    try:
        from fuzz import TARGETS
    finally:
        sys.path.remove(str(FUZZ.parent))
    seconds = max(5, 60 // len(TARGETS))
    result = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(FUZZ), "--seconds", str(seconds), "--work", str(tmp_path / "w")]
    proc = subprocess.run(
        [*cmd, "--json", str(result)], capture_output=True, text=True, timeout=900
    )
    assert result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(result.read_text())
    assert proc.returncode == 0, (summary["total"], summary["findings"], proc.stdout[-3000:])
    assert set(summary["targets"]) == set(TARGETS)
    for name, r in summary["targets"].items():
        # (a checkpoint target runs a few inputs a second: it ran, and found its code)
        assert r["executions"] > 0 and r["coverage_edges"] > 10, (name, r)
        assert r["crashes"] == r["unhandled"] == 0, (name, r)
    total = summary["total"]
    assert total["loader_crashes"] == total["loader_unhandled"] == 0, summary["targets"]["pte"]
