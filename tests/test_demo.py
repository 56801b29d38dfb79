"""The demo on the shipped model speaks: readable answers through ExecuTorch's TextLLMRunner,
task accuracy on the runtime, and no native log lines in its output."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_output_is_readable_and_free_of_native_logs(export_trained_default):
    done = subprocess.run(
        [sys.executable, "-m", "edgelora.demo", "--from-export", str(export_trained_default)]
        + ["--limit", "20"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    # the reverse adapter reverses the demo's first prompt, base does not
    assert "reverse   -> 'sings fish happy'" in out, out
    assert "base      -> 'sings fish happy'" not in out
    assert re.search(r"opposite\s+-> 'the young king likes a cold cake'", out), out
    assert re.search(r"reverse\s+\(20 prompts\): base.pte\s+\d", out)
    # nothing from ExecuTorch's C++ logging (e.g. "[stats.h:225]", "I tokenizers:...")
    native = [
        ln
        for ln in (out + done.stderr).splitlines()
        if re.match(r"(\[\w+\.(h|cpp):\d+\]|[IWE] \w+:)", ln.strip())
    ]
    assert not native, native[:5]
    assert "<x" not in out  # no filler tokens of a random model
