"""Coverage-guided fuzzing (atheris, libFuzzer) of every reader of user files.

    python bench/fuzz.py [--seconds 120] [--targets pte,manifest,...] [--work DIR]
        [--json bench/results/fuzz.json]

Seeds are real files: the trained tiny model in ``examples/tiny`` (an HF directory: config,
safetensors, tokenizer; its adapters), a ``.pth``, a shard index and a ``params.json`` written
from it, and an export made here of a smaller model (``fuzz_campaign.SEED_MODEL``, ``--recipe q4_0
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
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

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


# --- targets (in the fuzzing process) ----------------------------------------------------


class Target:
    """``seed`` is the file a target mutates; ``run(data)`` feeds one mutant to the reader."""

    def __init__(self, name: str, seeds: Path, scratch: Path) -> None:
        import json

        self.name, self.seeds, self.scratch = name, seeds, scratch
        self.export = seeds / "export"
        # the export's first adapter: its program and switchable inputs are seeds
        manifest = json.loads((self.export / "manifest.json").read_text())
        self.adapter = sorted(manifest["switchable"]["adapters"])[0]
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

        self.seed = self.export / f"{self.adapter}.pte"
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

        self.seed = self.export / f"{self.adapter}.lora.safetensors"
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
            self.export / f"{self.adapter}.lora.safetensors", sw.slots, sw.input_dtypes[0]
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


def main(argv: list[str] | None = None) -> int:
    from edgelora.bench.fuzz_campaign import (
        _atheris_version,
        load_accepted,
        make_seeds,
        run_target,
    )

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
    p.add_argument(
        "--seeds-export",
        type=Path,
        default=None,
        metavar="DIR",
        help="an export to take as the export seed (switchable, with template.pte and an "
        "adapter program) instead of making one (the CI smoke passes the suite's)",
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
    seeds = make_seeds(ns.work, export=ns.seeds_export)
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


if __name__ == "__main__":
    sys.exit(main())
