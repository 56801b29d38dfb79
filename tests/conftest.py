"""Shared fixtures: a tiny model config, PEFT adapters on disk, and a few exports.

Lowering to XNNPACK costs ~40 s per program even for one layer, so each export below is made
once per test run and shared by the tests that inspect it -- also across pytest-xdist workers
(ci/setup.sh runs two): the first worker to need one makes it under a file lock, the other
waits for it and reads the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from edgelora.models.args import ModelArgs

TINY = {
    "dim": 64,
    "n_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "multiple_of": 32,
    "max_seq_len": 48,
}


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    return ModelArgs.from_dict(TINY)


def _once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """A directory ``make(dir)`` filled once per test run: per session without xdist; with
    xdist, in the directory the workers' base temps share, under a lock, so a second worker
    waits for the first one's result instead of making it again."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        path = tmp_path_factory.mktemp(name)
        make(path)
        return path
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    path = root / name
    with FileLock(str(path) + ".lock"):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)  # a worker that failed half-way
            path.mkdir()
            make(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def params_file(tmp_path_factory) -> Path:
    path = _once(
        tmp_path_factory, "params", lambda d: (d / "params.json").write_text(json.dumps(TINY))
    )
    return path / "params.json"


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, tiny_args) -> dict[str, Path]:
    """Two PEFT adapters: 'chat' on all seven projections (r=4), 'code' on q/v (r=8, rslora)."""
    from edgelora.models.llama import build_model
    from edgelora.weights.adapter_files import save_peft_adapter
    from edgelora.weights.synthetic import random_adapter

    def make(root: Path) -> None:
        model = build_model(tiny_args)
        chat = random_adapter(model, "chat", rank=4, alpha=8, seed=1)
        code = random_adapter(model, "code", rank=8, alpha=4, targets=("q_proj", "v_proj"), seed=2)
        for w in code.modules.values():
            w.use_rslora = True
        save_peft_adapter(chat, root / "chat", tiny_args)
        save_peft_adapter(code, root / "code", tiny_args)

    root = _once(tmp_path_factory, "adapters", make)
    return {"chat": root / "chat", "code": root / "code"}


def _export(out: Path, params: Path, adapters: dict[str, Path], *extra: str) -> Path:
    from edgelora.export.cli import main

    argv = ["--params", str(params), "--output-dir", str(out), *extra]
    for name, path in adapters.items():
        argv += ["--lora", f"{name}={path}"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def export_8da4w(tmp_path_factory, params_file, adapter_dirs) -> Path:
    """8da4w g32 + int4 embedding: base.pte, chat.pte, code.pte, bundle.pte (methods base,
    chat, code), switchable.pte with chat/code.lora.safetensors, foundation.ptd."""
    argv = ("--embedding-bits", "4", "--embedding-group-size", "32", "--bundle", "--switchable")
    make = lambda d: _export(d / "q", params_file, adapter_dirs, *argv)  # noqa: E731
    return _once(tmp_path_factory, "exp-q", make) / "q"


@pytest.fixture(scope="session")
def export_8da4w_base_only(tmp_path_factory, params_file) -> Path:
    """The same foundation settings as ``export_8da4w`` with no adapters."""
    argv = ("--embedding-bits", "4", "--embedding-group-size", "32")
    make = lambda d: _export(d / "q-base", params_file, {}, *argv)  # noqa: E731
    return _once(tmp_path_factory, "exp-q-base", make) / "q-base"


@pytest.fixture(scope="session")
def export_fp32(tmp_path_factory, params_file, adapter_dirs) -> Path:
    """fp32 with the plain PyTorch attention path (``export_8da4w`` uses the custom ops)."""
    argv = ("--qmode", "none", "--sdpa", "plain")
    make = lambda d: _export(d / "fp32", params_file, {"chat": adapter_dirs["chat"]}, *argv)  # noqa: E731
    return _once(tmp_path_factory, "exp-fp32", make) / "fp32"
