"""Shared fixtures: the tiny model config, adapters and checkpoints on disk (each made once per
test run, whichever worker asks first), and ``export_NAME`` for every export of the matrix in
:mod:`tests.shared_exports`; the hooks that order the longest tests first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edgelora.models.args import ModelArgs

from .hf_fixtures import make_family_dir
from .shared_exports import EXPORTS, SharedExports, once, shared_root
from .tiny import TINY

# ci/setup.sh runs two workers on two cores: one intra-op thread each. With torch's default
# (one per core) the eager transformers reference of examples/tiny (thousands of tiny
# forwards) ran 28x slower beside an export -- 357 s against 12.7 s alone -- its threads
# waiting on each other while the other worker held the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    return ModelArgs.from_dict(TINY)


@pytest.fixture(scope="session")
def params_file(tmp_path_factory) -> Path:
    path = once(
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

    root = once(tmp_path_factory, "adapters", make)
    return {"chat": root / "chat", "code": root / "code"}


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> Path:
    """A 1-layer ``LlamaForCausalLM`` (transformers) with PEFT adapters 'qv' (q/v, r=4) and
    'rs' (all seven, rslora), and the reference logits of transformers + PEFT in ``refs.pt``:
    base, qv, rs with its scale halved (``:scale=0.5``), and qv merged (``merge_and_unload``)."""
    from .hf_fixtures import ALL7, hf_logits, make_hf, peft_adapter

    def make(root: Path) -> None:
        hf = make_hf(seed=3, num_hidden_layers=1, max_position_embeddings=32)
        hf.save_pretrained(root / "llama")
        refs = {"base": hf_logits(hf)}
        qv = peft_adapter(hf, root / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        refs["qv"] = hf_logits(qv)
        rs = peft_adapter(
            hf, root / "rs", seed=1, r=4, lora_alpha=8, target_modules=ALL7, use_rslora=True
        )
        for module in rs.modules():  # the reference for ':scale=0.5'
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling["default"] *= 0.5
        refs["rs"] = hf_logits(rs)
        refs["qv_merged"] = hf_logits(qv.merge_and_unload())
        torch.save(refs, root / "refs.pt")

    return once(tmp_path_factory, "hf-llama", make)


@pytest.fixture(scope="session")
def hf_deepseek(tmp_path_factory) -> Path:
    """A 1-layer dense ``DeepseekV3ForCausalLM`` with a PEFT adapter 'lora' on the MLA
    projections, and transformers + PEFT reference logits in ``refs.pt``."""
    from .hf_fixtures import MLA_TARGETS, PROMPT, make_deepseek, peft_adapter

    def make(root: Path) -> None:
        # Latent ranks of 32 and v_head_dim 16 so 8da4w (group 32) quantizes wq_b, wkv_b, wo.
        hf = make_deepseek(
            seed=4,
            num_hidden_layers=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            v_head_dim=16,
            kv_lora_rank=32,
            max_position_embeddings=32,
        )
        hf.save_pretrained(root / "ds")
        lora = peft_adapter(
            hf, root / "lora", seed=5, r=4, lora_alpha=8, target_modules=MLA_TARGETS
        )
        with torch.no_grad():
            refs = {"base": hf(PROMPT).logits[0], "lora": lora(PROMPT).logits[0]}
        torch.save(refs, root / "refs.pt")

    return once(tmp_path_factory, "hf-deepseek", make)


@pytest.fixture(scope="session")
def trained_tiny() -> Path:
    """``examples/tiny``: the trained model, its adapters and held-out evaluation files."""
    return Path(__file__).resolve().parents[1] / "examples" / "tiny"


@pytest.fixture(scope="session")
def hf_families(tmp_path_factory) -> Callable[[str], Path]:
    """``hf_families(name)``: the directory :func:`make_family_dir` fills, made once."""
    return lambda name: once(tmp_path_factory, f"family-{name}", lambda d: make_family_dir(d, name))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "uses_exports(*names): shared exports a test requests dynamically"
    )


# The longest tests that make their own exports (measured: 45-120 s each), run first: started
# late, one of them would leave the other worker idle at the end of the run.
RUN_FIRST = (
    "tests/bench/test_fuzz.py",
    "tests/export/test_concurrency.py",
    "tests/export/test_memory_estimate.py",
    "tests/export/test_crash.py",
)


def _first(item) -> int:
    path = item.nodeid.split("::")[0]
    return RUN_FIRST.index(path) if path in RUN_FIRST else len(RUN_FIRST)


def pytest_collection_modifyitems(session, config, items):
    """The longest tests first (:data:`RUN_FIRST`; the sort is stable), and which shared exports
    this session's tests need (for the work stealing above): the ``export_*`` fixtures they
    name, and those a ``uses_exports`` mark declares."""
    items.sort(key=_first)
    needed = []
    for item in items:
        names = [f.removeprefix("export_") for f in getattr(item, "fixturenames", ())]
        for mark in item.iter_markers("uses_exports"):
            names += mark.args
        for name in names:
            if name in EXPORTS and name not in needed:
                needed.append(name)
    config.stash[_NEEDED] = needed


_NEEDED = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def shared_exports(request, tmp_path_factory) -> SharedExports:
    needed = request.config.stash.get(_NEEDED, [])
    return SharedExports(shared_root(tmp_path_factory) / "exports", needed)


def _export_fixture(name: str):
    def fixture(shared_exports: SharedExports, request) -> Path:
        return shared_exports.get(name, request)

    fixture.__doc__ = EXPORTS[name].doc
    return pytest.fixture(scope="session", name=f"export_{name}")(fixture)


for _name in EXPORTS:
    globals()[f"export_{_name}"] = _export_fixture(_name)
