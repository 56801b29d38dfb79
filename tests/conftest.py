"""Shared fixtures: a tiny model config, PEFT adapters on disk, and a few exports.

Lowering to XNNPACK costs ~10 s per program even for one layer, so each export below is made
once per session and shared by the tests that inspect it.
"""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def params_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, tiny_args) -> dict[str, Path]:
    """Two PEFT adapters: 'chat' on all seven projections (r=4), 'code' on q/v (r=8, rslora)."""
    from edgelora.models.adapter_files import save_peft_adapter
    from edgelora.models.adapters import random_adapter
    from edgelora.models.llama import build_model

    root = tmp_path_factory.mktemp("adapters")
    model = build_model(tiny_args)
    chat = random_adapter(model, "chat", rank=4, alpha=8, seed=1)
    code = random_adapter(model, "code", rank=8, alpha=4, targets=("q_proj", "v_proj"), seed=2)
    for w in code.modules.values():
        w.use_rslora = True
    return {
        "chat": save_peft_adapter(chat, root / "chat", tiny_args),
        "code": save_peft_adapter(code, root / "code", tiny_args),
    }


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
    out = tmp_path_factory.mktemp("exp") / "q"
    argv = ("--embedding-bits", "4", "--embedding-group-size", "32", "--bundle", "--switchable")
    return _export(out, params_file, adapter_dirs, *argv)


@pytest.fixture(scope="session")
def export_8da4w_base_only(tmp_path_factory, params_file) -> Path:
    """The same foundation settings as ``export_8da4w`` with no adapters."""
    out = tmp_path_factory.mktemp("exp") / "q-base"
    return _export(out, params_file, {}, "--embedding-bits", "4", "--embedding-group-size", "32")


@pytest.fixture(scope="session")
def export_fp32(tmp_path_factory, params_file, adapter_dirs) -> Path:
    """fp32 with the plain PyTorch attention path (``export_8da4w`` uses the custom ops)."""
    out = tmp_path_factory.mktemp("exp") / "fp32"
    argv = ("--qmode", "none", "--sdpa", "plain")
    return _export(out, params_file, {"chat": adapter_dirs["chat"]}, *argv)


# Exports shared by many tests (session fixtures). Under pytest-xdist (``-n 2 --dist
# loadgroup``, as ci/setup.sh runs) every test using one of them runs on the same worker, so
# each export is made once; the other worker takes the tests that make their own.
SHARED_EXPORTS = ("export_8da4w", "export_8da4w_base_only", "export_fp32")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_EXPORTS):
            item.add_marker(pytest.mark.xdist_group("shared-exports"))
