"""A corpus of broken and hostile inputs through the command-line tools: each must give a
one-line error and a non-zero exit, never a traceback, a hang or a crash, and write nothing.

Program and data files are run in a subprocess (a crash there would kill pytest); the export
cases fail before any long step, in-process. ``bench/fuzz.py`` mutates the same readers at
random for a bounded time.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgelora.export.cli import main as export_main


def _mutants(blob: bytes, seed: int) -> dict[str, bytes]:
    """Empty, truncated, bit-flipped and junk variants of a file's bytes."""
    rng = random.Random(seed)
    out = {
        "empty": b"",
        "trunc-half": blob[: len(blob) // 2],
        "trunc-100": blob[:100],
        "junk": bytes(rng.randrange(256) for _ in range(4096)),
    }
    for frac in (0.02, 0.25, 0.5, 0.75):
        b = bytearray(blob)
        at = int(len(b) * frac)
        for i in range(at, min(at + 16, len(b))):
            b[i] ^= 0xFF
        out[f"flip-{int(frac * 100)}"] = bytes(b)
    return out


_RUNNER = r"""
import contextlib, io, json, sys
from edgelora.runtime.cli import main as run_main
from edgelora.runtime.inspect import main as inspect_main
for kind, pte, ptd in json.loads(sys.argv[1]):
    for tool, argv in (("run", [pte, "--data", ptd, "--prompt-ids", "1,2", "--max-new-tokens", "2"]),
                       ("inspect", [pte, ptd])):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = (run_main if tool == "run" else inspect_main)(argv)
        # own line: the runtime may have logged to stdout without a newline
        print("\ncase-result: " + json.dumps({"case": kind, "tool": tool, "code": code,
                                              "err": err.getvalue()}), flush=True)
"""


def test_broken_programs_and_data_files(export_8da4w, tmp_path):
    good_pte, good_ptd = export_8da4w / "chat.pte", export_8da4w / "foundation.ptd"
    cases = []
    for kind, (good, other) in {"pte": (good_pte, good_ptd), "ptd": (good_ptd, good_pte)}.items():
        for name, data in _mutants(good.read_bytes(), seed=len(kind)).items():
            path = tmp_path / f"{name}.{kind}"
            path.write_bytes(data)
            pair = (str(path), str(other)) if kind == "pte" else (str(other), str(path))
            cases.append((f"{name}.{kind}", *pair))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # no crash, no uncaught exception
    results = [
        json.loads(line.split("case-result: ", 1)[1])
        for line in proc.stdout.splitlines()
        if "case-result: " in line
    ]
    assert len(results) == 2 * len(cases)
    for r in results:
        assert r["code"] != 0, r
        assert "Traceback" not in r["err"], r
        if r["tool"] == "run":
            assert r["code"] == 2 and r["err"].count("\n") == 1, r
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _adapter_variant(src: Path, dst: Path, *, config=None, weights=None, raw=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if weights is not None:
        w = load_file(str(dst / "adapter_model.safetensors"))
        weights(w)
        save_file(w, str(dst / "adapter_model.safetensors"))
    if raw is not None:
        blob = (dst / "adapter_model.safetensors").read_bytes()
        (dst / "adapter_model.safetensors").write_bytes(raw(blob))
    return dst


def _first(w):
    return next(iter(w))


def _set(key_fn, value_fn):
    return lambda w: w.__setitem__(key_fn(w), value_fn(w[key_fn(w)]))


ADAPTER_CASES = {
    "rank-string": ({"config": lambda c: c.update(r="4")}, "field 'r' must be a positive integer"),
    "rank-negative": ({"config": lambda c: c.update(r=-4)}, "field 'r' must be a positive"),
    "rank-zero": ({"config": lambda c: c.update(r=0)}, "field 'r' must be a positive"),
    "rank-huge": ({"config": lambda c: c.update(r=10**9)}, "gives it rank 1000000000"),
    "unknown-field": ({"config": lambda c: c.update(frobnicate={"a": 1})}, "'frobnicate'"),
    "alpha-string": ({"config": lambda c: c.update(lora_alpha="x")}, "'lora_alpha' must be"),
    "targets-int": ({"config": lambda c: c.update(target_modules=5)}, "'target_modules' must"),
    "config-not-json": ({"config": None, "raw": None}, None),  # filled below
    "nan": ({"weights": _set(_first, lambda t: t.clone().fill_(float("nan")))}, "NaN or inf"),
    "inf": ({"weights": _set(_first, lambda t: t.clone().fill_(float("inf")))}, "NaN or inf"),
    "int-weights": ({"weights": _set(_first, lambda t: t.int())}, "must be a 2-D float"),
    "empty-weights": ({"raw": lambda b: b""}, "adapter_model.safetensors"),
    "trunc-weights": ({"raw": lambda b: b[: len(b) // 2]}, "adapter_model.safetensors"),
    "flip-header": (
        {"raw": lambda b: b[:8] + bytes(x ^ 0xFF for x in b[8:40]) + b[40:]},
        "adapter_model.safetensors",
    ),
}
del ADAPTER_CASES["config-not-json"]


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_broken_adapters(case, adapter_dirs, params_file, tmp_path, capsys):
    kwargs, message = ADAPTER_CASES[case]
    bad = _adapter_variant(adapter_dirs["chat"], tmp_path / "bad", **kwargs)
    out = tmp_path / "out"
    code = export_main(
        ["--params", str(params_file), "--output-dir", str(out), "--lora", f"chat={bad}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()


def _checkpoint_cases(tiny_args, tmp_path) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import save_file

    from edgelora.models.llama import build_model

    sd = {k: v.contiguous() for k, v in build_model(tiny_args).state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    blob = good.read_bytes()
    cases = {}
    mutants = {k: v for k, v in _mutants(blob, seed=7).items() if not k.startswith("flip")}
    # (flips in tensor data are valid files with other weights; flip the JSON header instead)
    mutants["flip-header"] = blob[:20] + bytes(x ^ 0xFF for x in blob[20:36]) + blob[36:]
    for name, data in mutants.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        cases[name] = (p, p.name)
    nan = dict(sd, **{"norm.weight": torch.full_like(sd["norm.weight"], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"))
    cases["nan"] = (tmp_path / "nan.safetensors", "NaN")
    torch.save({"model": sd, "opt": torch.optim.SGD}, tmp_path / "pickled.pth")
    cases["pickled-object"] = (tmp_path / "pickled.pth", "pickled.pth")
    wrong = {k: v for k, v in sd.items() if k != "output.weight"}
    save_file(wrong, str(tmp_path / "missing-key.safetensors"))
    cases["missing-key"] = (tmp_path / "missing-key.safetensors", "output.weight")
    return cases


def test_broken_checkpoints_and_params(tiny_args, params_file, tmp_path, capsys):
    work = tmp_path / "in"
    work.mkdir()
    cases = {
        k: (["--checkpoint", str(p), "--params", str(params_file)], m)
        for k, (p, m) in _checkpoint_cases(tiny_args, work).items()
    }
    params = json.loads(params_file.read_text())
    for name, change, message in [
        ("heads-not-dividing-dim", {"n_heads": 5}, "n_heads"),
        ("kv-heads-not-dividing-heads", {"n_kv_heads": 3}, "n_kv_heads"),
        ("negative-layers", {"n_layers": -1}, "n_layers"),
        ("string-dim", {"dim": "64"}, "dim"),
        ("huge-vocab", {"vocab_size": 10**9}, "GiB is available"),
        ("vocab-past-int32", {"vocab_size": 10**12}, "vocab_size is out of range"),
    ]:
        p = work / f"{name}.json"
        p.write_text(json.dumps({**params, **change}))
        cases[name] = (["--params", str(p)], message)
    (work / "not-json.json").write_text("{dim: 64")
    cases["params-not-json"] = (["--params", str(work / "not-json.json")], "not-json.json")
    for name, (argv, message) in cases.items():
        out = tmp_path / "out"
        code = export_main([*argv, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and not out.exists(), name
