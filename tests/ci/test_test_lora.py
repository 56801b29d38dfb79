"""ci/test_lora.sh runs end to end and reports every check, for 8da4w (the product path; fp32
programs are output-matched by tests/runtime and tests/export, and `bash ci/test_lora.sh` with
no QMODES runs both)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "ci" / "test_lora.sh"


def test_test_lora_script_passes():
    env = dict(os.environ, PYTHON=sys.executable, QMODES="8da4w")
    out = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("PASS foundation.ptd byte-identical") for line in lines)
    assert sum(line.startswith("PASS ") and "max abs diff" in line for line in lines) == 3
    assert not any(line.startswith("FAIL") for line in lines)
