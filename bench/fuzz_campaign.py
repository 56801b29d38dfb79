"""The fuzzing campaign's parent side (``bench/fuzz.py`` is the entry point and the targets):
the seed files, one target's run in restarted child processes, and ExecuTorch's loader on the
program mutants our parser accepted. Kept out of the fuzzed process's imports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgelora.tests.tiny import TINY

REPO = Path(__file__).resolve().parent.parent
FUZZ_SCRIPT = Path(__file__).with_name("fuzz.py")  # the children run it with --child

# --- seeds -------------------------------------------------------------------------------


# The export seed: a 1-layer model of random weights, so a program is a few hundred kB of
# which the flatbuffer structure is a large share (the mutations reach it), and exports in
# seconds. The checkpoint, adapter and tokenizer seeds are examples/tiny's trained files.
SEED_MODEL = {**TINY, "max_seq_len": 64}  # the test suite's exported model


def make_seeds(work: Path, log=print, export: Path | None = None) -> Path:
    """The seed files (made once under ``work/seeds``); ``export``: an existing export to copy
    as the export seed instead of making one."""
    seeds = work / "seeds"
    if (seeds / "done").exists():
        return seeds
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    tiny = REPO / "examples" / "tiny"
    hf = seeds / "hf"
    shutil.copytree(tiny / "model", hf)
    for name in ("reverse", "opposite"):
        shutil.copytree(tiny / "adapters" / name, seeds / "adapters" / name)
    import torch
    from safetensors.torch import load_file, save_file

    from edgelora.models.args import ModelArgs
    from edgelora.models.llama import build_model
    from edgelora.weights.adapter_files import save_peft_adapter
    from edgelora.weights.checkpoint import open_checkpoint
    from edgelora.weights.synthetic import random_adapter

    out = seeds / "export"
    if export is not None:
        shutil.copytree(export, out)
    else:
        small = ModelArgs.from_dict(SEED_MODEL)
        (seeds / "small.json").write_text(json.dumps(SEED_MODEL))
        model = build_model(small)
        lora = []
        for name, targets, seed in (("a", None, 1), ("b", ("q_proj", "v_proj"), 2)):
            kw = {} if targets is None else {"targets": targets}
            save_peft_adapter(random_adapter(model, name, rank=4, alpha=8, seed=seed, **kw),
                              seeds / "small-adapters" / name, small)  # fmt: skip
            lora.append(f"--lora={name}={seeds / 'small-adapters' / name}")
        cmd = [sys.executable, "-m", "edgelora.export.cli", "--params", str(seeds / "small.json")]
        cmd += ["--recipe", "q4_0", "--switchable", "--adapter-template", "--output-dir", str(out)]
        cmd += ["--tokenizer", str(hf / "tokenizer.json")] if _vocab(hf) <= 96 else []
        log("  exporting the seed export ...")
        subprocess.run(cmd + lora, check=True, capture_output=True)
    ckpt = open_checkpoint(hf)
    sd = {k: v.clone() for k, v in ckpt.take_state_dict().items()}
    torch.save(sd, seeds / "model.pth")
    (seeds / "params.json").write_text(json.dumps(ModelArgs.from_dict(ckpt.params).to_dict()))
    sharded = seeds / "sharded"
    shutil.copytree(hf, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(str(hf / "model.safetensors"))
    keys = sorted(weights)
    index = {"metadata": {}, "weight_map": {}}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(sharded / name))
        index["weight_map"].update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (seeds / "done").write_text("")
    return seeds


def _vocab(hf: Path) -> int:
    return json.loads((hf / "config.json").read_text())["vocab_size"]


# --- the loader check and the campaign (parent) -------------------------------------------


def load_accepted(work: Path, ptd: Path) -> dict:
    """ExecuTorch's loader on every program mutant our parser accepted, each in a forked child:
    how many loaded, were refused with an error, or killed the child."""
    script = r"""
import os, sys, pathlib
from edgelora.runtime.program import LlamaProgram, register_kernels
from edgelora.errors import EdgeLoraError
from executorch.runtime import Runtime
register_kernels()
Runtime.get()
ptd = sys.argv[1]
for p in sorted(pathlib.Path(sys.argv[2]).glob("*.pte")):
    pid = os.fork()
    if pid == 0:
        try:
            prog = LlamaProgram(p, ptd)
            prog.forward([1, 2], 0)
            os._exit(0)
        except EdgeLoraError:
            os._exit(3)
        except Exception as e:
            p.with_suffix(".err").write_text(f"{type(e).__name__}: {e}")
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    print("loader:", p.name, status, flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ptd), str(work / "scratch" / "accepted")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    counts = {"ran": 0, "refused": 0, "unhandled": 0, "crashed": 0}
    crashed, unhandled = [], []
    for line in proc.stdout.splitlines():
        if line.startswith("loader: "):
            _, name, status = line.split()
            status = int(status)
            if os.WIFSIGNALED(status):
                counts["crashed"] += 1
                crashed.append(name)
            else:
                kind = {0: "ran", 3: "refused"}.get(os.WEXITSTATUS(status), "unhandled")
                counts[kind] += 1
                if kind == "unhandled":
                    unhandled.append(name)
    for name in crashed:
        shutil.copy(
            work / "scratch" / "accepted" / name, work / "findings" / f"pte-loader-crash-{name}"
        )
    for name in unhandled:
        src = work / "scratch" / "accepted" / name
        shutil.copy(src, work / "findings" / f"pte-loader-unhandled-{name}")
        if src.with_suffix(".err").exists():
            text = src.with_suffix(".err").read_text()
            (work / "findings" / f"pte-loader-unhandled-{name}.txt").write_text(text)
    return counts


_STAT = re.compile(r"stat::(\w+):\s+(\d+)")
_COV = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")


def run_target(
    name: str, seeds: Path, work: Path, seconds: int, log=print, seed: int | None = None
) -> dict:
    """Fuzz one target for ``seconds`` in child processes (restarted after a crash). With a
    ``seed``, libFuzzer's choices and Python's hashing are fixed: the inputs tried are the same
    sequence in every run, of which a slower machine runs a shorter prefix."""
    start, result = time.monotonic(), {"executions": 0, "crashes": 0, "restarts": 0}
    env = {**os.environ} if seed is None else {**os.environ, "PYTHONHASHSEED": "0"}
    cov = ft = 0
    left = seconds
    while left > 0:
        proc = subprocess.run(
            [
                sys.executable,
                str(FUZZ_SCRIPT),
                "--child",
                name,
                "--work",
                str(work),
                "--seconds",
                str(int(left)),
                *([] if seed is None else ["--seed", str(seed)]),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        stats = dict((k, int(v)) for k, v in _STAT.findall(proc.stderr))
        result["executions"] += stats.get("number_of_executed_units", 0)
        for m in _COV.finditer(proc.stderr):
            cov, ft = max(cov, int(m.group(2))), max(ft, int(m.group(3)))
        if proc.returncode != 0:
            result["crashes"] += 1
            result["restarts"] += 1
            tail = proc.stderr[-1500:]
            log(f"    {name}: child ended with {proc.returncode}:\n{tail}")
            if "number_of_executed_units" not in proc.stderr:
                break  # it could not start: do not spin
        left = seconds - (time.monotonic() - start)
        if left < 3:
            break
    result["coverage_edges"], result["features"] = cov, ft
    result["seconds"] = round(time.monotonic() - start, 1)
    result["unhandled"] = len(list((work / "findings").glob(f"{name}-unhandled-*[!.txt]")))
    return result


def _atheris_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atheris")
    except PackageNotFoundError:
        return None
