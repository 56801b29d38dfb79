"""Fuzz our readers with mutated files for a bounded time; count inputs and crashes.

    python bench/fuzz.py EXPORT_DIR ADAPTER_DIR PARAMS_JSON [--seconds 60 per target]
        [--json bench/results/fuzz.json]

Seeds are real files: a program and the foundation from an export (``EXPORT_DIR/chat.pte`` or
the first adapter program, ``foundation.ptd``), a PEFT adapter directory, a params.json, and a
checkpoint written from the params. Each mutation (random bit flips, a truncation, an
overwritten block, inserted bytes, or for JSON a field set to a value of another type) goes
through the reader the CLI tools use:

* ``pte``: ``verify_program`` (our parser, then the ExecuTorch runtime's loader and the
  checksums), ``ptd``: ``ptd_entries`` and ``verify_program`` with it as the foundation,
* ``adapter-weights`` / ``adapter-config``: ``load_adapter``, ``checkpoint``: ``open_checkpoint``
  + ``load_checkpoint``, ``params``: ``ModelArgs.from_json``.

An input passes if it is accepted or refused with one of our errors (``EdgeLoraError``). Any
other exception is an *unhandled* error, a dead child process (signal) a *crash*: the input is
saved under ``--crashes`` and the child restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_MARK = "fuzz-result: "  # the runtime may log to stdout too
TARGETS = ("pte", "ptd", "adapter-weights", "adapter-config", "checkpoint", "params")


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    op = rng.randrange(5)
    if op == 0 and b:  # flip 1-8 bits
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b) + 1) :]
    elif op == 2 and b:  # overwrite a block with random bytes
        at = rng.randrange(len(b))
        for i in range(at, min(len(b), at + rng.randint(1, 64))):
            b[i] = rng.randrange(256)
    elif op == 3:  # insert bytes
        at = rng.randrange(len(b) + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    else:  # a flip in the first 256 bytes (headers)
        if b:
            b[rng.randrange(min(256, len(b)))] ^= 0xFF
    return bytes(b)


_ODD_VALUES = [None, -1, 0, 2**63, 1e308, float("nan"), "x", "../../x", [], {}, True, "8"]


def _mutate_json(blob: bytes, rng: random.Random) -> bytes:
    try:
        obj = json.loads(blob)
    except ValueError:
        return _mutate(blob, rng)
    if not isinstance(obj, dict) or not obj or rng.random() < 0.3:
        return _mutate(blob, rng)
    key = rng.choice(sorted(obj))
    obj[key] = rng.choice(_ODD_VALUES)
    return json.dumps(obj).encode()


def _child(target: str, seeds: dict, seconds: float, seed: int, last: Path) -> dict:
    """Mutate and feed inputs until ``seconds`` pass; before each input, write it to ``last``
    (so the parent can save it if this process dies)."""
    from edgelora.errors import EdgeLoraError
    from edgelora.models.args import ModelArgs

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="edgelora-fuzz-"))
    args = ModelArgs.from_json(seeds["params"])
    tried, refused, unhandled = 0, 0, []
    source = {
        "pte": seeds["pte"],
        "ptd": seeds["ptd"],
        "adapter-weights": Path(seeds["adapter"]) / "adapter_model.safetensors",
        "adapter-config": Path(seeds["adapter"]) / "adapter_config.json",
        "checkpoint": seeds["checkpoint"],
        "params": seeds["params"],
    }[target]
    blob = Path(source).read_bytes()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        mutated = (_mutate_json if target in ("adapter-config", "params") else _mutate)(blob, rng)
        last.write_bytes(mutated)
        tried += 1
        try:
            _feed(target, mutated, seeds, args, work)
        except EdgeLoraError:
            refused += 1
        except Exception as e:  # an error we do not turn into a clear message
            unhandled.append(f"{type(e).__name__}: {e}"[:300] + traceback.format_exc(limit=-2))
    shutil.rmtree(work, ignore_errors=True)
    return {
        "tried": tried,
        "refused": refused,
        "unhandled": unhandled[:20],
        "unhandled_count": len(unhandled),
    }


def _feed(target: str, data: bytes, seeds: dict, args, work: Path) -> None:
    from edgelora.format.checksums import verify_program
    from edgelora.format.pte import ptd_entries
    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.weights.adapter_files import load_adapter
    from edgelora.weights.checkpoint import load_checkpoint, open_checkpoint

    if target == "pte":
        path = work / "x.pte"
        path.write_bytes(data)
        verify_program(path, Path(seeds["ptd"]))
    elif target == "ptd":
        path = work / "x.ptd"
        path.write_bytes(data)
        ptd_entries(path)
        verify_program(Path(seeds["pte"]), path)
    elif target.startswith("adapter"):
        adir = work / "adapter"
        shutil.rmtree(adir, ignore_errors=True)
        shutil.copytree(seeds["adapter"], adir)
        name = "adapter_model.safetensors" if target == "adapter-weights" else "adapter_config.json"
        (adir / name).write_bytes(data)
        load_adapter(adir, args, "fuzz")
    elif target == "checkpoint":
        path = work / "x.safetensors"
        path.write_bytes(data)
        load_checkpoint(build_model(args), open_checkpoint(path))
    else:
        path = work / "params.json"
        path.write_bytes(data)
        ModelArgs.from_json(path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        target, seeds, seconds, seed, last = sys.argv[2:7]
        result = _child(target, json.loads(seeds), float(seconds), int(seed), Path(last))
        print("\n" + _MARK + json.dumps(result), flush=True)
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("export_dir", type=Path)
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("params", type=Path)
    p.add_argument("--seconds", type=float, default=60, help="per target (default 60)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()

    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.weights.tensor_files import save_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="edgelora-fuzz-seeds-"))
    ckpt = save_checkpoint(build_model(ModelArgs.from_json(ns.params)), tmp / "model.safetensors")
    ptes = sorted(p for p in ns.export_dir.glob("*.pte") if p.name != "base.pte")
    seeds = {
        "pte": str(ptes[0]),
        "ptd": str(ns.export_dir / "foundation.ptd"),
        "adapter": str(ns.adapter_dir),
        "checkpoint": str(ckpt),
        "params": str(ns.params),
    }
    results = {}
    for i, target in enumerate(t for t in ns.targets.split(",") if t):
        row = {"tried": 0, "refused": 0, "unhandled_count": 0, "unhandled": [], "crashes": 0}
        end = time.monotonic() + ns.seconds
        restart = 0
        while time.monotonic() < end - 1:
            last = tmp / f"last-{target}"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                target,
                json.dumps(seeds),
                str(end - time.monotonic()),
                str(1000 * i + restart),
                str(last),
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
            )
            if proc.returncode == 0:
                out = json.loads(proc.stdout.rsplit(_MARK, 1)[1].splitlines()[0])
                for k in ("tried", "refused", "unhandled_count"):
                    row[k] += out[k]
                row["unhandled"] += out["unhandled"]
                break
            row["crashes"] += 1  # the child died on the input in `last`
            ns.crashes.mkdir(parents=True, exist_ok=True)
            saved = ns.crashes / f"{target}-{restart}.bin"
            shutil.copy(last, saved)
            row["unhandled"].append(
                f"crash (exit {proc.returncode}) on {saved}: " + proc.stderr[-300:]
            )
            restart += 1
        results[target] = row
        print(
            f"{target}: {row['tried']} inputs, {row['refused']} refused with a clear error, "
            f"{row['unhandled_count']} unhandled, {row['crashes']} crashes",
            flush=True,
        )
    shutil.rmtree(tmp, ignore_errors=True)
    total = {
        k: sum(r[k] for r in results.values())
        for k in ("tried", "refused", "unhandled_count", "crashes")
    }
    text = json.dumps(
        {"seconds_per_target": ns.seconds, "total": total, "targets": results}, indent=2
    )
    print(text)
    if ns.json:
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
