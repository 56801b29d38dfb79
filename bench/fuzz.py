"""Coverage-guided fuzzing (atheris, libFuzzer) of every reader of user files.

    python bench/fuzz.py [--seconds 120] [--targets pte,manifest,...] [--work DIR]
        [--json bench/results/fuzz.json]

Seeds are real files: the trained tiny model in ``examples/tiny`` (an HF directory: config,
safetensors, tokenizer; its adapters), a ``.pth``, a shard index and a ``params.json`` written
from it, and an export made here of a smaller model (:data:`SEED_MODEL`, ``--recipe q4_0
--switchable --adapter-template``, two adapters). Each target runs in its own process under libFuzzer,
with our modules instrumented (``atheris.instrument_imports``), for ``--seconds``:

==================  ====================================================================
target              reader (what the command-line tools call on that file)
==================  ====================================================================
``pte``             ``verify_program`` (our parser, checksums). Every mutant is
                    re-checksummed first, so it gets past the checksum into the parser;
                    those the parser accepts are loaded by ExecuTorch's loader afterwards,
                    each in a forked child (the loader aborts the process on some programs)
``ptd``             ``read_ptd`` / ``ptd_entries``
``manifest``        ``read_export`` on an export directory (names, values, every file verified)
``adapter-inputs``  ``load_adapter_tensors`` against the manifest's slots
``template``        ``patch_template`` (locating and replacing the template's bytes)
``adapter-config``  ``load_adapter`` (PEFT config semantics)
``adapter-weights`` ``load_adapter`` (safetensors)
``checkpoint``      ``open_checkpoint`` + ``load_checkpoint`` of an HF directory's safetensors
``shard-index``     the same with ``model.safetensors.index.json``
``pth``             ``open_checkpoint`` of a Meta ``.pth``
``params``          ``ModelArgs.from_json``
``config``          ``open_checkpoint`` of an HF directory's ``config.json``
``tokenizer``       ``check_tokenizer`` (ExecuTorch's parser), ``tokenizers``, ``end_of_turn_ids``
==================  ====================================================================

An input passes if it is accepted or refused with one of our errors (``EdgeLoraError``). Any
other exception is an *unhandled error*: the input and its traceback are saved under
``WORK/findings`` and fuzzing goes on. A dead process (signal) or an input over libFuzzer's
``-timeout`` is a *crash* or *hang*, saved by libFuzzer there, and the target restarts.
Every finding is a regression case in ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from edgelora.tests.tiny import TINY  # noqa: E402 - (bench is run as a script)

TARGETS = (
    "pte",
    "ptd",
    "manifest",
    "adapter-inputs",
    "template",
    "adapter-config",
    "adapter-weights",
    "checkpoint",
    "shard-index",
    "pth",
    "params",
    "config",
    "tokenizer",
)
COMBINED = "all"  # one process fuzzing every target (--combined: the CI smoke)
LOADER_SAMPLE = 300  # parser-accepted program mutants given to ExecuTorch's loader, per run


# --- seeds -------------------------------------------------------------------------------


# The export seed: a 1-layer model of random weights, so a program is a few hundred kB of
# which the flatbuffer structure is a large share (the mutations reach it), and exports in
# seconds. The checkpoint, adapter and tokenizer seeds are examples/tiny's trained files.
SEED_MODEL = {**TINY, "max_seq_len": 64}  # the test suite's exported model


def make_seeds(work: Path, log=print) -> Path:
    """The seed files (made once under ``work/seeds``)."""
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

    small = ModelArgs.from_dict(SEED_MODEL)
    (seeds / "small.json").write_text(json.dumps(SEED_MODEL))
    model = build_model(small)
    lora = []
    for name, targets, seed in (("a", None, 1), ("b", ("q_proj", "v_proj"), 2)):
        kw = {} if targets is None else {"targets": targets}
        save_peft_adapter(random_adapter(model, name, rank=4, alpha=8, seed=seed, **kw),
                          seeds / "small-adapters" / name, small)  # fmt: skip
        lora.append(f"--lora={name}={seeds / 'small-adapters' / name}")
    out = seeds / "export"
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


# --- targets (in the fuzzing process) ----------------------------------------------------


class Target:
    """``seed`` is the file a target mutates; ``run(data)`` feeds one mutant to the reader."""

    def __init__(self, name: str, seeds: Path, scratch: Path) -> None:
        self.name, self.seeds, self.scratch = name, seeds, scratch
        self.export = seeds / "export"
        getattr(self, "_setup_" + name.replace("-", "_"))()

    def _file(self, name: str, data: bytes) -> Path:
        path = self.scratch / name
        path.write_bytes(data)
        return path

    def _dir_with(self, src: Path, name: str) -> Path:
        """A copy of ``src`` (hard links) whose ``name`` the mutant replaces."""
        d = self.scratch / "dir"
        if not d.exists():
            shutil.copytree(src, d, copy_function=os.link)
        return d

    def _put(self, d: Path, name: str, data: bytes) -> None:
        path = d / name
        path.unlink(missing_ok=True)
        path.write_bytes(data)

    # pte: re-checksummed, so mutants reach the parser
    def _setup_pte(self):
        from edgelora.format.checksums import PROGRAM_SHA_METHOD
        from edgelora.format.pte import read_pte

        self.seed = self.export / "a.pte"
        self.seed_bytes = self.seed.read_bytes()
        self.own = read_pte(self.seed).constants[PROGRAM_SHA_METHOD]
        self.accepted = self.scratch.parent / "accepted"
        self.accepted.mkdir(exist_ok=True)

    def _run_pte(self, data: bytes):
        from edgelora.format.checksums import restamp, verify_program

        if data.count(self.own[:8]) == 1:
            data = restamp(data, data.index(self.own[:8]))
        path = self._file("p.pte", data)
        verify_program(path, self.export / "foundation.ptd")
        kept = len(os.listdir(self.accepted))
        if kept < LOADER_SAMPLE and data != self.seed_bytes:
            self._file("p.pte", data).rename(self.accepted / f"{kept:05d}.pte")

    def _setup_ptd(self):
        self.seed = self.export / "foundation.ptd"

    def _run_ptd(self, data: bytes):
        from edgelora.format.pte import ptd_entries, read_ptd

        path = self._file("f.ptd", data)
        read_ptd(path)
        ptd_entries(path)

    def _setup_manifest(self):
        self.seed = self.export / "manifest.json"

    def _run_manifest(self, data: bytes):
        from edgelora.format.manifest import read_export

        d = self._dir_with(self.export, "manifest.json")
        self._put(d, "manifest.json", data)
        read_export(d, wait_s=0)

    def _setup_adapter_inputs(self):
        from edgelora.format.manifest import read_export

        self.seed = self.export / "a.lora.safetensors"
        self.switchable = read_export(self.export).switchable

    def _run_adapter_inputs(self, data: bytes):
        from edgelora.format.adapter_inputs import load_adapter_tensors

        sw = self.switchable
        load_adapter_tensors(self._file("a.safetensors", data), sw.slots, sw.input_dtypes[0])

    def _setup_template(self):
        import torch

        from edgelora.format.adapter_inputs import load_adapter_tensors
        from edgelora.format.manifest import read_export
        from edgelora.format.template import slot_weights

        manifest = read_export(self.export)
        self.seed = self.export / "template.pte"
        self.entry = manifest.switchable.template
        sw = manifest.switchable
        inputs = load_adapter_tensors(
            self.export / "a.lora.safetensors", sw.slots, sw.input_dtypes[0]
        )
        self.weights = [w.to(getattr(torch, self.entry.dtype)) for w in slot_weights(inputs)]

    def _run_template(self, data: bytes):
        from edgelora.format.template import patch_template

        path = self._file("t.pte", data)
        patch_template(path, self.entry, hashlib.sha256(data).hexdigest(), self.weights)

    def _setup_adapter_config(self):
        self.seed = self.seeds / "adapters" / "reverse" / "adapter_config.json"
        self._adapter_setup()

    def _setup_adapter_weights(self):
        self.seed = self.seeds / "adapters" / "reverse" / "adapter_model.safetensors"
        self._adapter_setup()

    def _adapter_setup(self):
        from edgelora.models.args import ModelArgs

        self.args = ModelArgs.from_json(self.seeds / "params.json")

    def _run_adapter(self, data: bytes):
        from edgelora.weights.adapter_files import load_adapter

        d = self._dir_with(self.seeds / "adapters" / "reverse", self.seed.name)
        self._put(d, self.seed.name, data)
        load_adapter(d, self.args, "x")

    _run_adapter_config = _run_adapter_weights = _run_adapter

    def _setup_checkpoint(self):
        self.seed, self.dir = self.seeds / "hf" / "model.safetensors", self.seeds / "hf"
        self._adapter_setup()

    def _setup_shard_index(self):
        self._adapter_setup()
        self.dir = self.seeds / "sharded"
        self.seed = self.dir / "model.safetensors.index.json"

    def _setup_config(self):
        self.seed, self.dir = self.seeds / "hf" / "config.json", self.seeds / "hf"
        self._adapter_setup()

    def _run_checkpoint(self, data: bytes):
        d = self._dir_with(self.dir, self.seed.name)
        self._put(d, self.seed.name, data)
        self._load(d)

    def _load(self, path: Path):
        """What an export does with a checkpoint: open it, build the model its parameters
        describe (on the meta device) and load it strictly."""
        from edgelora.export.memory import check_memory
        from edgelora.models.args import ModelArgs
        from edgelora.models.llama import build_model
        from edgelora.weights.checkpoint import load_checkpoint, open_checkpoint

        ckpt = open_checkpoint(path)
        args = ModelArgs.from_dict(ckpt.params) if ckpt.params else self.args
        check_memory(args)  # as export_llama does before it builds anything
        load_checkpoint(build_model(args, empty=True), ckpt, assign=True)

    _run_shard_index = _run_config = _run_checkpoint

    def _setup_pth(self):
        self.seed = self.seeds / "model.pth"
        self._adapter_setup()

    def _run_pth(self, data: bytes):
        self._load(self._file("m.pth", data))

    def _setup_params(self):
        self.seed = self.seeds / "params.json"

    def _run_params(self, data: bytes):
        from edgelora.models.args import ModelArgs

        ModelArgs.from_json(self._file("params.json", data))

    def _setup_tokenizer(self):
        from edgelora.format.chat_template import ChatTemplate

        self.seed = self.seeds / "hf" / "tokenizer.json"
        self.template = ChatTemplate(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}", {}
        )

    def _run_tokenizer(self, data: bytes):
        from edgelora.errors import ProgramError
        from edgelora.export.tokenizer import check_tokenizer
        from edgelora.format.chat_template import end_of_turn_ids
        from edgelora.runtime.chat import load_tokenizer

        path = self._file("tokenizer.json", data)
        check_tokenizer(path, 1 << 20)
        load_tokenizer(path)
        end_of_turn_ids(self.template, path, ProgramError)

    def run(self, data: bytes) -> None:
        getattr(self, "_run_" + self.name.replace("-", "_"))(data)


def fuzz_child(name: str, seeds: Path, work: Path, seconds: int, seed: int | None) -> None:
    """Run under libFuzzer (this process does not return)."""
    import atheris

    with atheris.instrument_imports(include=["edgelora"]):
        import edgelora.errors
        import edgelora.export.memory  # noqa: F401
        import edgelora.export.tokenizer  # noqa: F401
        import edgelora.format.adapter_inputs  # noqa: F401
        import edgelora.format.chat_template  # noqa: F401
        import edgelora.format.checksums  # noqa: F401
        import edgelora.format.manifest  # noqa: F401
        import edgelora.format.pte  # noqa: F401
        import edgelora.format.template  # noqa: F401
        import edgelora.models.args  # noqa: F401
        import edgelora.runtime.chat  # noqa: F401
        import edgelora.weights.adapter_files  # noqa: F401
        import edgelora.weights.checkpoint  # noqa: F401
    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    names = TARGETS if name == COMBINED else (name,)
    targets = []
    for t in names:
        scratch = Path(tempfile.mkdtemp(prefix=f"{t}-", dir=work / "scratch"))
        targets.append(Target(t, seeds, scratch))
    findings = work / "findings"
    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    if name == COMBINED:  # an input's first byte picks the target, the rest is its file
        for i, target in enumerate(targets):
            (corpus / f"seed-{target.name}").write_bytes(bytes([i]) + target.seed.read_bytes())
    else:
        shutil.copy(targets[0].seed, corpus / "seed")
    expected = edgelora.errors.EdgeLoraError
    counts = {t.name: 0 for t in targets}
    count_file = work / f"counts-{name}.json"

    def one(data: bytes) -> None:
        if name == COMBINED:
            if not data:
                return
            target, data = targets[data[0] % len(targets)], data[1:]
        else:
            target = targets[0]
        counts[target.name] += 1
        if sum(counts.values()) % 500 == 0:
            count_file.write_text(json.dumps(counts))
        try:
            target.run(data)
        except expected:
            pass
        except Exception:  # noqa: BLE001 - every other exception is a finding
            digest = hashlib.sha256(data).hexdigest()[:16]
            path = findings / f"{target.name}-unhandled-{digest}"
            if not path.exists():
                path.write_bytes(data)
                path.with_suffix(".txt").write_text(traceback.format_exc())
                print(f"fuzz-unhandled: {path.name}", file=sys.stderr, flush=True)

    largest = max(t.seed.stat().st_size for t in targets)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=20"]
    argv += ["-rss_limit_mb=6000", "-print_final_stats=1", f"-artifact_prefix={findings}/{name}-"]
    argv += ["-max_len=" + str(max(4096, 2 * largest + 1))]
    argv += [] if seed is None else [f"-seed={seed}"]
    atheris.Setup(argv, one)
    atheris.Fuzz()


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
                __file__,
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=120, help="fuzzing time per target")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgelora-fuzz")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--combined",
        action="store_true",
        help="fuzz every target in one process for --seconds in all (an input's first byte "
        "picks the target; the CI smoke): one start-up instead of one per target",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="libFuzzer's random seed (and PYTHONHASHSEED=0): the same inputs in every run, "
        "as the CI smoke needs; default: a new seed each run, as a campaign wants",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.combined and ns.targets != ",".join(TARGETS):
        p.error("--combined fuzzes every target")
    if ns.child is not None:
        fuzz_child(ns.child, ns.work / "seeds", ns.work, ns.seconds, ns.seed)
        return 0
    targets = ns.targets.split(",")
    for t in targets:
        if t not in TARGETS:
            p.error(f"--targets: unknown {t!r} (have {', '.join(TARGETS)})")
    (ns.work / "findings").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ns.work / "scratch", ignore_errors=True)
    (ns.work / "scratch").mkdir()
    seeds = make_seeds(ns.work)
    results = {}
    if ns.combined:
        print(f"fuzzing {', '.join(targets)} in one process for {ns.seconds} s ...", flush=True)
        both = run_target(COMBINED, seeds, ns.work, ns.seconds, seed=ns.seed)
        counts = json.loads((ns.work / f"counts-{COMBINED}.json").read_text())
        for t in targets:
            unhandled = len(list((ns.work / "findings").glob(f"{t}-unhandled-*[!.txt]")))
            results[t] = {"executions": counts.get(t, 0), "unhandled": unhandled, "crashes": 0}
        results[targets[0]]["crashes"] = both["crashes"]  # (a crash is the process's)
        combined = {k: both[k] for k in ("executions", "coverage_edges", "features", "seconds")}
        print(f"  {json.dumps(combined)}", flush=True)
    for t in [] if ns.combined else targets:
        print(f"fuzzing {t} for {ns.seconds} s ...", flush=True)
        results[t] = run_target(t, seeds, ns.work, ns.seconds, seed=ns.seed)
        print(f"  {t}: {json.dumps(results[t])}", flush=True)
    if "pte" in targets:
        results["pte"]["loader"] = load_accepted(ns.work, seeds / "export" / "foundation.ptd")
        print(f"  pte mutants given to ExecuTorch's loader: {results['pte']['loader']}")
    total = {k: sum(r[k] for r in results.values()) for k in ("executions", "crashes", "unhandled")}
    loader = results.get("pte", {}).get("loader", {})
    loader_crashes = loader.get("crashed", 0) + loader.get("unhandled", 0)
    summary = {
        "atheris": _atheris_version(),
        "combined": combined if ns.combined else None,
        "seconds_per_target": ns.seconds,
        "seed": ns.seed,
        "total": {
            **total,
            "loader_crashes": loader.get("crashed", 0),
            "loader_unhandled": loader.get("unhandled", 0),
        },  # fmt: skip
        "targets": results,
        "findings": sorted(p.name for p in (ns.work / "findings").iterdir()),
    }
    print(json.dumps(summary["total"]))
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if not (total["crashes"] or total["unhandled"] or loader_crashes) else 1


def _atheris_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atheris")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
