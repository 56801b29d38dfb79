"""Crash consistency, by fault injection at every file-system call (``tests/export/faults.py``).

Each writer -- a whole export over a previous one, an add, an add with ``--overwrite``, a
remove -- runs once in a subprocess that copies the directory before each counted call: copy
k is what a SIGKILL before call k leaves. For every k:

- before anyone recovers, ``OUT`` is a complete export, old or new (every file's sha256 is its
  manifest's): the commit is one swap, so there is no moment without one;
- after the next writer takes the lock (which completes or rolls back what was left), ``OUT``
  is still complete, old or new, and nothing else is left beside it: no staging directory, no
  commit record, no lock file;
- the outcome never goes back: old up to the swap, new after it.

Real SIGKILLs at a few k leave exactly what the copies show, so the copies stand for kills.
The same whole export is run with the swap unavailable (``EDGELORA_NO_EXCHANGE``, the two-step
commit other systems get): there ``OUT`` may be missing between the two renames, and the next
writer must finish the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.export.output import export_lock

State = frozenset


def _state(out: Path) -> State | None:
    """The export in ``out`` as (file, sha256) pairs if it is complete, else ``None``."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]
        for name, entry in files.items():
            path = out / name
            if path.is_symlink() or not path.is_file():
                return None
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                return None
        return frozenset((n, e["sha256"]) for n, e in files.items())
    except (OSError, ValueError, KeyError):
        return None


def _run(root: Path, mode: str, arg: str, argv: list[str], env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgelora.tests.export.faults", str(root), mode, arg, "--"]
    return subprocess.run(
        cmd + [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def _tree(root: Path) -> dict[str, str]:
    """Relative path (staging names made generic) -> sha256, of every file under ``root``
    (the lock file's text names a pid: only its presence counts)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = re.sub(r"staging-[^/]+", "staging-*", str(path.relative_to(root)))
            data = b"" if rel.endswith(".lock") else path.read_bytes()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _inject(tmp_path: Path, start: Path, argv: list[str], *, swap: bool = True, kills=()) -> dict:
    """Run ``argv`` with ``OUT`` (= ``work/out``) starting as a copy of ``start``; check every
    kill point as the module docstring says; returns the counts."""
    work, snaps = tmp_path / "work", tmp_path / "snaps"
    out = work / "out"
    shutil.copytree(start, out)
    initial = tmp_path / "initial"
    shutil.copytree(work, initial)
    old = _state(out)
    assert old is not None
    snaps.mkdir()
    env = {} if swap else {"EDGELORA_NO_EXCHANGE": "1"}
    argv = [a if a != "OUT" else out for a in argv]
    proc = _run(work, "snapshot", str(snaps), argv, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = _state(out)
    assert new is not None and new != old
    assert [p.name for p in work.iterdir()] == ["out"]  # a finished writer leaves nothing
    calls = json.loads((snaps / "calls.json").read_text())
    n = len(calls)
    assert n == len([p for p in snaps.iterdir() if p.is_dir()]) and n > 5
    # real kills leave what the copies show (copy k: before call k)
    for k in kills:
        shutil.rmtree(work)
        shutil.copytree(initial, work)
        killed = _run(work, "kill", str(k), argv, env)
        assert killed.returncode == -9, (k, killed.stderr[-2000:])
        assert _tree(work) == _tree(snaps / str(k)), (k, calls[k - 1])
    outcomes = []
    for k in range(1, n + 1):
        snap_out = snaps / str(k) / "out"
        before = _state(snap_out)
        if swap:
            assert before in (old, new), f"kill before call {k} ({calls[k - 1]}): OUT incomplete"
        with export_lock(snap_out, log=lambda _: None):
            pass
        after = _state(snap_out)
        assert after in (old, new), f"kill before call {k} ({calls[k - 1]}), then recovery"
        if swap:
            assert after == before, k  # nothing to finish: recovery leaves OUT as it is
        left = sorted(p.name for p in (snaps / str(k)).iterdir())
        assert left == ["out"], f"kill before call {k} ({calls[k - 1]}): {left} left"
        outcomes.append("new" if after == new else "old")
    flips = sum(a != b for a, b in zip(outcomes, outcomes[1:], strict=False))
    assert outcomes[0] == "old" and flips <= 1, outcomes  # old up to the commit, new after
    return {"calls": n, "old": outcomes.count("old"), "new": outcomes.count("new")}


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "two-step"])
def test_every_kill_in_a_whole_export(
    tmp_path, export_8da4w_base_only, params_file, adapter_dirs, swap
):
    """A whole export (base + chat) over a previous one on the same foundation (base only)."""
    argv = ["--params", params_file, "--recipe", "q4_0", f"--lora=chat={adapter_dirs['chat']}"]
    counts = _inject(tmp_path, export_8da4w_base_only, argv + ["--output-dir", "OUT"], swap=swap)
    assert counts["old"] > 10 and counts["new"] >= 1, counts


def test_every_kill_in_an_add(tmp_path, export_8da4w_slots, adapter_dirs):
    """An adapter added without model arguments (its inputs and its program from
    template.pte); three real kills (first call, middle, last) checked against the copies."""
    argv = ["--add-to", "OUT", "--lora", f"code={adapter_dirs['code']}"]
    probe = _inject(tmp_path / "probe", export_8da4w_slots, argv)
    kills = (1, probe["old"], probe["calls"])
    counts = _inject(tmp_path / "real", export_8da4w_slots, argv, kills=kills)
    assert counts == probe


def test_every_kill_in_an_overwrite(tmp_path, export_8da4w_slots, adapter_dirs):
    """``chat`` (a lowered program and its inputs) replaced by another adapter."""
    argv = ["--add-to", "OUT", "--lora", f"chat={adapter_dirs['code']}", "--overwrite"]
    counts = _inject(tmp_path, export_8da4w_slots, argv)
    assert counts["new"] >= 1


def test_every_kill_in_a_remove(tmp_path, export_8da4w_slots):
    counts = _inject(tmp_path, export_8da4w_slots, ["--add-to", "OUT", "--remove", "chat"])
    assert counts["new"] >= 1
