"""Determinism across processes, and many writers and readers on one export.

- The same export in two fresh processes, with different ``PYTHONHASHSEED``, thread counts,
  working directories and spellings of every path (absolute, relative with ``..``, through a
  symlink): every file byte-identical.
- Writers adding and removing adapters and re-exporting the whole directory (each a fresh
  ``export_llama`` process, some killed at a random moment) while a reader reads the export in
  a loop: the reader never sees a half
  export (``read_export`` verifies every file against the manifest it read), and nothing is
  lost (each adapter's last completed operation is what the export shows).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgelora.format.manifest import read_export


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_export_in_fresh_processes_is_byte_identical(tmp_path, params_file, adapter_dirs):
    """The default recipe (calibrated), a switchable program, two adapters."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "in-link").symlink_to(adapter_dirs["chat"].parent)
    shutil.copy(params_file, tmp_path / "params.json")
    base = ["--switchable"]
    rel = os.path.relpath(adapter_dirs["code"], tmp_path / "b" / "c")
    spelled = {
        # absolute paths, one thread, one hash seed
        "a": (
            tmp_path / "a",
            "1",
            "1",
            [
                "--params",
                str(tmp_path / "params.json"),
                f"--lora=chat={adapter_dirs['chat']}",
                f"--lora=code={adapter_dirs['code']}",
                "--output-dir",
                str(tmp_path / "a" / "out"),
            ],
        ),
        # relative, through a symlink and "..", two threads, another seed
        "b": (
            tmp_path / "b" / "c",
            "2",
            "2",
            [
                "--params",
                "../../b/../params.json",
                "--lora=chat=../../in-link/code/../chat/",
                f"--lora=code={rel}",
                "--output-dir",
                "./../c/out",
            ],
        ),
    }
    outs = {}
    for key, (cwd, seed, threads, argv) in spelled.items():
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads}
        proc = subprocess.run(
            [sys.executable, "-m", "edgelora.export.cli", *argv, *base],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        outs[key] = _files(cwd / "out")
    assert outs["a"].keys() == outs["b"].keys()
    differ = [n for n in outs["a"] if outs["a"][n] != outs["b"][n]]
    assert not differ, differ


def _op(out: Path, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgelora.export.cli", "--add-to", str(out), *argv]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


_READER = r"""
import sys, time
from edgelora.format.manifest import read_export
from edgelora.errors import EdgeLoraError
out, seconds = sys.argv[1], float(sys.argv[2])
reads, failures, seen = 0, [], set()
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        m = read_export(out)  # every file verified against this manifest
        assert "foundation.ptd" in m.files and "base" in m.programs
        seen.add(tuple(sorted(m.switchable.adapters)))
        reads += 1
    except EdgeLoraError as e:
        failures.append(str(e))
    time.sleep(0.005)  # (a busy reader would starve the writers of this 2-core machine)
print(reads, len(seen), repr(failures[:3]), len(failures))
"""


def test_writers_readers_and_kills_on_one_export(
    tmp_path, export_8da4w_slots, adapter_dirs, params_file
):
    """Two writers adding and removing adapters (a third of them SIGKILLed at a random moment)
    and, once, a whole export over the directory (the recipe it started as: base + chat,
    switchable, template), every operation a fresh process, beside a reader."""
    out = tmp_path / "out"
    shutil.copytree(export_8da4w_slots, out)
    rng = random.Random(5)
    seconds = 50.0
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(out), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    export_argv = [
        "--params",
        params_file,
        "--recipe",
        "q4_0",
        f"--lora=chat={adapter_dirs['chat']}",
    ]
    export_argv += ["--switchable", "--switchable-slots", "all:8", "--adapter-template"]
    export_argv += ["--output-dir", out]
    last: dict[str, tuple[str, bool, float]] = {}  # name -> its last operation, ok?, end time
    exports: list[tuple[bool, float]] = []  # whole exports: ok?, end time
    present = {"w0": [], "w1": []}
    running: dict[str, tuple[subprocess.Popen, str, str, float]] = {}
    kills = done = 0
    start = time.monotonic()
    end = start + seconds - 10
    counter = 0
    while time.monotonic() < end or running:
        for w in [*present, "exporter"]:
            if w in running or time.monotonic() >= end:
                continue
            # one whole export, a third of the way in: it holds the lock for its whole run
            if w == "exporter" and (exports or time.monotonic() < start + seconds / 3):
                continue
            if w == "exporter":
                cmd = [sys.executable, "-m", "edgelora.export.cli", *map(str, export_argv)]
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                running[w] = (proc, "", "export", None)  # (kills inside it: test_crash.py)
                continue
            if present[w] and rng.random() < 0.4:
                name, op = rng.choice(present[w]), "remove"
                argv = ["--remove", name]
            else:
                counter += 1
                name, op = f"{w}a{counter}", "add"
                argv = ["--lora", f"{name}={adapter_dirs[rng.choice(['chat', 'code'])]}"]
            # each writer's first operation is killed early (at least one kill, however fast
            # the machine); then a third at a random moment, at most 4 in all (however slow:
            # enough operations must complete to check what they left)
            kill_at = None
            if counter <= 2:
                kill_at = time.monotonic() + rng.uniform(0.5, 1.5)
            elif rng.random() < 0.35 and kills + len(running) < 4:
                kill_at = time.monotonic() + rng.uniform(0.5, 6.0)
            running[w] = (_op(out, argv), name, op, kill_at)
        for w, (proc, name, op, kill_at) in list(running.items()):
            if kill_at is not None and proc.poll() is None and time.monotonic() > kill_at:
                proc.send_signal(signal.SIGKILL)
            if proc.poll() is None:
                continue
            err = proc.stderr.read()
            del running[w]
            ok = proc.returncode == 0
            # (a whole export that committed meanwhile dropped what is to be removed)
            dropped = op == "remove" and proc.returncode == 2 and "has no adapter" in err
            assert ok or dropped or proc.returncode == -signal.SIGKILL, err
            kills += proc.returncode == -signal.SIGKILL
            done += ok
            if op == "export":
                exports.append((ok, time.monotonic()))
                present = {k: [] for k in present}  # what was added may be gone: leave it be
                continue
            last[name] = (op, ok, time.monotonic())
            if ok and op == "add":
                present[w].append(name)
            if op == "remove" or not ok:  # after a kill either state is allowed: leave it be
                if name in present[w]:
                    present[w].remove(name)
        time.sleep(0.05)
    stdout, stderr = reader.communicate(timeout=120)
    reads, states, failures, n_failures = stdout.split(maxsplit=3)
    assert reader.returncode == 0 and int(n_failures) == 0, (failures, stderr[-2000:])
    assert int(reads) > 20 and int(states) >= 3, stdout
    # a last writer finishes what a killed one left; then nothing is lost
    last_writer = [sys.executable, "-m", "edgelora.export.cli", "--add-to", str(out)]
    assert subprocess.run([*last_writer, "--remove", "chat"], capture_output=True).returncode == 0
    final = set(read_export(out).switchable.adapters)
    margin, checked = 2.0, 0  # (a process exits within ms of its commit; 2 s orders them)
    for name, (op, ok, t) in last.items():
        later = [(e_ok, e_t) for e_ok, e_t in exports if e_t > t - margin]
        if not ok:
            continue
        if not later:  # no whole export after it: its own operation decides
            assert (name in final) == (op == "add"), (name, op)
        elif any(e_ok and e_t > t + margin for e_ok, e_t in later):  # re-exported after it
            assert name not in final, name
        else:
            continue  # a killed or too-close export: either state is allowed
        checked += 1
    assert done >= 6 and kills >= 1 and checked >= 3, (done, kills, checked, exports)
    assert any(ok for ok, _ in exports), exports
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == {
        p.name for p in out.iterdir() if p.name != "manifest.json"
    }
