"""The fuzzing smoke: ``bench/fuzz.py --combined`` -- every target in one libFuzzer process, an
input's first byte picking the target -- for 30 seconds (the long campaign's results are
``bench/results/fuzz.json``). Its seed is fixed (``--seed``), so every run tries (mostly) the
same sequence of inputs and a slower machine a shorter prefix of it: a failure here is most
likely a change in the code, not the luck of the draw (new findings come from the campaign,
which draws a new seed each run, and become cases in ``tests/test_fuzz_regressions.py``).
Every target must run and the run find coverage, with no crash, hang or unhandled error, and no
program mutant our parser accepts may crash ExecuTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "bench" / "fuzz.py"


def test_fuzz_smoke_every_target(tmp_path, export_8da4w_slots):
    """(The export seed is the suite's shared export with a template, not one made here.)"""
    result = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(FUZZ), "--combined", "--seconds", "30", "--seed", "1"]
    cmd += ["--seeds-export", str(export_8da4w_slots)]
    cmd += ["--work", str(tmp_path / "w"), "--json", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(result.read_text())
    assert proc.returncode == 0, (summary["total"], summary["findings"], proc.stdout[-3000:])
    assert summary["combined"]["coverage_edges"] > 200, summary["combined"]
    for name, r in summary["targets"].items():
        # (a checkpoint target runs a few inputs a second: it ran)
        assert r["executions"] > 0, (name, summary["targets"])
        assert r["crashes"] == r["unhandled"] == 0, (name, r)
    assert len(summary["targets"]) == 13
    total = summary["total"]
    assert total["loader_crashes"] == total["loader_unhandled"] == 0, summary["targets"]["pte"]
