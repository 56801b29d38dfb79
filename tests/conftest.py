"""Shared fixtures: the tiny model config, adapters and checkpoints on disk, and the matrix of
exports every test that needs one reuses.

Lowering costs seconds per program even for one layer, so each export in :data:`EXPORTS` is
made once per test run and read by every test that needs it -- also across pytest-xdist
workers (ci/setup.sh runs two): exports live in a directory the workers share, each made
under its own file lock. A worker that needs an export another worker is making does not sit
idle: it makes one of the others this session needs first (work stealing), so both cores
lower programs until the matrix is done.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from edgelora.models.args import ModelArgs

from .hf_fixtures import FAMILIES
from .tiny import TINY

# ci/setup.sh runs two workers on two cores: one intra-op thread each. With torch's default
# (one per core) the eager transformers reference of examples/tiny (thousands of tiny
# forwards) ran 28x slower beside an export -- 357 s against 12.7 s alone -- its threads
# waiting on each other while the other worker held the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

FAMILY_NAMES = sorted(FAMILIES)
# Family exports that run ExecuTorch's custom SDPA (with their own scales, a sliding layer
# beside a full one); the others take the plain path, whose programs lower faster.
CUSTOM_SDPA_FAMILIES = ("gemma3", "granite", "qwen3")
# Merging (lora/attach.merge_adapter: W += B A for every wrapper) is one code path for every
# split layout, and each family's fp32 test already checks the adapter's B A in its
# layout; the Llama merge is also checked against PEFT in test_hf_export. So merged programs are
# exported for the split layout with biases and every projection (llama-bias) and for the one
# layout that merges differently: Phi-3's fused qkv/gate_up rows (6 exports fewer per
# test run).
MERGED_FAMILIES = ("llama-bias", "phi3")


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    return ModelArgs.from_dict(TINY)


def _shared_root(tmp_path_factory) -> Path:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.getbasetemp() / "shared"
    return tmp_path_factory.getbasetemp().parent / "shared"


def _try_make(root: Path, name: str, make: Callable[[Path], object], *, wait: bool) -> bool:
    """Make ``root/name`` once (under ``root/name.lock``); False if another process holds the
    lock and ``wait`` is not set."""
    from filelock import FileLock, Timeout

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{name}.lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return False
    try:
        if not (root / f"{name}.done").exists():
            shutil.rmtree(root / name, ignore_errors=True)  # a worker that failed half-way
            (root / name).mkdir()
            make(root / name)
            (root / f"{name}.done").touch()
    finally:
        lock.release()
    return True


def _once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """A directory ``make(dir)`` fills once per test run, whichever worker asks first."""
    root = _shared_root(tmp_path_factory)
    _try_make(root, name, make, wait=True)
    return root / name


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

    return _once(tmp_path_factory, "hf-llama", make)


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

    return _once(tmp_path_factory, "hf-deepseek", make)


@pytest.fixture(scope="session")
def trained_tiny() -> Path:
    """``examples/tiny``: the trained model, its adapters and held-out evaluation files."""
    return Path(__file__).resolve().parents[1] / "examples" / "tiny"


def make_family_dir(root: Path, name: str) -> None:
    """``root/model`` (a tiny HF model of family ``name``), ``root/lora`` (a PEFT adapter on
    its usual targets) and ``root/refs.pt``: transformers (+ PEFT) logits of base, lora and
    the merged adapter. The qwen3 model also ships a tokenizer.json (with ChatML's special
    tokens) and a chat_template.jinja, and says bos 3 and eos [7, t], t being the third token
    its greedy decode of PROMPT_TEXT generates."""
    import copy

    from .hf_fixtures import FAMILIES, hf_logits, make_family, peft_adapter

    # One layer unless the family's point needs two (a sliding and a full layer; a NoPE one).
    hf = make_family(name, seed=1, num_hidden_layers=2 if name in ("gemma3", "smollm3") else 1)
    lora = peft_adapter(hf, root / "lora", seed=2, r=4, lora_alpha=8, **FAMILIES[name].lora)
    refs = {"base": hf_logits(hf), "lora": hf_logits(lora)}
    refs["merged"] = hf_logits(copy.deepcopy(lora).merge_and_unload())
    if name == "qwen3":
        from tokenizers import Tokenizer

        from edgelora.runtime.tokenizer import write_char_tokenizer

        tok = write_char_tokenizer(root / "tokenizer.json", hf.config.vocab_size)
        chat_tokens(tok)
        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT).ids
        seq = list(ids)
        with torch.no_grad():
            for _ in range(3):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        stop = seq[-1]
        hf.config.bos_token_id, hf.config.eos_token_id = 3, [7, stop]
        hf.generation_config.bos_token_id, hf.generation_config.eos_token_id = 3, [7, stop]
        refs["greedy"] = seq[len(ids) :]
    hf.save_pretrained(root / "model")
    if name == "qwen3":
        import shutil

        from .chat_templates import QWEN3

        shutil.move(str(root / "tokenizer.json"), root / "model" / "tokenizer.json")
        (root / "model" / "chat_template.jinja").write_text(QWEN3)
    torch.save(refs, root / "refs.pt")


PROMPT_TEXT = "the lazy fox"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # the last two ids of the qwen3 fixture's vocab


def chat_tokens(path: Path) -> None:
    """Make the last two filler tokens of a :func:`write_char_tokenizer` file ChatML's special
    tokens (the vocabulary's size stays the model's)."""
    tok = json.loads(path.read_text())
    for entry, content in zip(tok["added_tokens"][-2:], CHAT_TOKENS, strict=True):
        entry.update(content=content, special=True)
    path.write_text(json.dumps(tok))


@pytest.fixture(scope="session")
def hf_families(tmp_path_factory) -> Callable[[str], Path]:
    """``hf_families(name)``: the directory :func:`make_family_dir` fills, made once."""
    return lambda name: _once(
        tmp_path_factory, f"family-{name}", lambda d: make_family_dir(d, name)
    )


# --- The export matrix ------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """``export_llama`` arguments of one shared export, from the inputs it needs."""

    inputs: tuple[str, ...]  # session fixtures the arguments refer to
    argv: Callable[..., list[str]]
    doc: str = ""


# 8da4w g32 everywhere, int4 embedding, no calibration: the recipe the fused and split exports
# compare under (a calibrated recipe measures fused and split layers apart, and may decide apart)
_Q = ["--recipe", "q4_0"]


def _tiny(params: Path, adapters: dict[str, Path], *names: str) -> list[str]:
    return ["--params", str(params)] + [f"--lora={n}={adapters[n]}" for n in names]


def _trained(tiny: Path) -> list[str]:
    return ["--checkpoint", str(tiny / "model")] + [
        f"--lora={a}={tiny / 'adapters' / a}" for a in ("reverse", "opposite")
    ]


EXPORTS: dict[str, Recipe] = {
    "8da4w": Recipe(
        ("params_file", "adapter_dirs"),
        lambda p, a: _tiny(p, a, "chat", "code") + _Q + ["--switchable"],
        "8da4w g32 + int4 embedding, custom SDPA: base, chat, code, switchable with "
        "chat/code.lora.safetensors",
    ),
    "8da4w_slots": Recipe(
        ("params_file", "adapter_dirs"),
        lambda p, a: (
            _tiny(p, a, "chat")
            + _Q
            + ["--switchable", "--switchable-slots", "all:8", "--adapter-template"]
        ),
        "as 8da4w with chat only and room in switchable.pte for later adapters (rank 8 on "
        "every projection), and template.pte with those slots: base, chat, switchable, "
        "template (issue 19's --add-to starts from it)",
    ),
    "8da4w_base_only": Recipe(
        ("params_file", "adapter_dirs"), lambda p, a: _tiny(p, a) + _Q, "the same, no adapters"
    ),
    "fp32": Recipe(
        ("params_file", "adapter_dirs"),
        lambda p, a: _tiny(p, a, "chat") + ["--qmode", "none", "--sdpa", "plain"],
        "fp32 with the plain PyTorch attention path: base, chat",
    ),
    "fp32_last": Recipe(
        ("params_file", "adapter_dirs"),
        lambda p, a: _tiny(p, a) + ["--qmode", "none", "--sdpa", "plain", "--logits", "last"],
        "as fp32 with --logits last, base only",
    ),
    "fused": Recipe(
        ("params_file", "adapter_dirs"),
        lambda p, a: _tiny(p, a, "chat", "code") + _Q + ["--fuse", "all", "--bundle"],
        "as 8da4w with --fuse all: base, chat, code (packed), bundle (methods base, chat, code)",
    ),
    "hf_fp32": Recipe(
        ("hf_llama",),
        lambda r: (
            ["--checkpoint", str(r / "llama"), "--qmode", "none"]
            + [f"--lora=qv={r / 'qv'}", f"--lora=rs={r / 'rs'}:scale=0.5"]
        ),
        "the HF Llama, fp32: base, qv, rs (scale 0.5)",
    ),
    "hf_8da4w": Recipe(("hf_llama",), lambda r: ["--checkpoint", str(r / "llama")], "8da4w, base"),
    "hf_merged": Recipe(
        ("hf_llama",),
        lambda r: (
            ["--checkpoint", str(r / "llama"), "--qmode", "none"]
            + [f"--lora=qv={r / 'qv'}", "--merge", "qv"]
        ),
        "fp32 with qv merged: qv.pte only",
    ),
    "hf_fp16": Recipe(
        ("hf_llama",),
        lambda r: ["--checkpoint", str(r / "llama"), "--qmode", "none", "--dtype", "fp16"],
        "fp16 compute, base",
    ),
    "mla_fused": Recipe(
        ("hf_deepseek",),
        lambda r: (
            ["--checkpoint", str(r / "ds"), "--qmode", "none", "--fuse", "mla"]
            + [f"--lora=lora={r / 'lora'}"]
        ),
        "the HF DeepSeek-V3, fp32, wq_a/wkv_a fused: base, lora (packed)",
    ),
    **{
        f"fam_{name}": Recipe(
            ("hf_families",),
            lambda f, name=name: (
                ["--checkpoint", str(f(name) / "model"), "--qmode", "none"]
                + [f"--lora=lora={f(name) / 'lora'}"]
            ),
            f"the tiny {name} model, fp32: base, lora",
        )
        for name in FAMILY_NAMES
    },
    **{
        f"fam_{name}_merged": Recipe(
            ("hf_families",),
            lambda f, name=name: (
                ["--checkpoint", str(f(name) / "model"), "--qmode", "none"]
                + [f"--lora=lora={f(name) / 'lora'}", "--merge", "lora"]
            ),
            f"the tiny {name} model, fp32, the adapter merged: lora.pte",
        )
        for name in MERGED_FAMILIES
    },
    **{
        f"fam_{name}_8da4w": Recipe(
            ("hf_families",),
            lambda f, name=name: (
                ["--checkpoint", str(f(name) / "model")]
                + ([] if name in CUSTOM_SDPA_FAMILIES else ["--sdpa", "plain"])
            ),
            f"the tiny {name} model, 8da4w: base",
        )
        for name in FAMILY_NAMES
    },
    "trained_fp32": Recipe(
        ("trained_tiny",),
        lambda t: _trained(t) + ["--qmode", "none"],
        "the shipped trained tiny model, fp32: base, reverse, opposite",
    ),
    "trained_default": Recipe(
        ("trained_tiny",),
        lambda t: _trained(t) + ["--switchable"],
        "the shipped trained tiny model with export_llama's default recipe: base, reverse, "
        "opposite, switchable (what the demo exports)",
    ),
    **{
        f"trained_{preset}": Recipe(
            ("trained_tiny",),
            lambda t, preset=preset: ["--checkpoint", str(t / "model"), "--recipe", preset],
            f"the shipped trained tiny model with --recipe {preset}: base",
        )
        # q4_k_m: trained_default; q4_0: the 8da4w exports (_Q); q4_k_s differs by a share
        for preset in ("q8_0",)
    },
    "mla_8da4w": Recipe(
        ("hf_deepseek",),
        lambda r: ["--checkpoint", str(r / "ds")],
        "8da4w, split: base (adapters under 8da4w: the Llama exports; on MLA: mla_fused)",
    ),
}


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


class SharedExports:
    def __init__(self, root: Path, needed: list[str]) -> None:
        self.root, self.needed = root, needed

    def _make(self, name: str, request) -> Callable[[Path], None]:
        from edgelora.export.cli import main

        recipe = EXPORTS[name]

        def make(d: Path) -> None:
            inputs = [request.getfixturevalue(f) for f in recipe.inputs]
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                code = main([*recipe.argv(*inputs), "--output-dir", str(d / "out")])
            (d / "log.txt").write_text(log.getvalue())
            assert code == 0, f"export {name} failed:\n{log.getvalue()}"

        return make

    def get(self, name: str, request) -> Path:
        """The output directory of export ``name`` (its log is ``../log.txt``); ``request``
        (of the fixture asking) provides the inputs of whatever this worker makes meanwhile."""
        while not (self.root / f"{name}.done").exists():
            if _try_make(self.root, name, self._make(name, request), wait=False):
                continue
            others = [n for n in self.needed if not (self.root / f"{n}.done").exists()]
            if not any(_try_make(self.root, n, self._make(n, request), wait=False) for n in others):
                _try_make(self.root, name, self._make(name, request), wait=True)
        return self.root / name / "out"


@pytest.fixture(scope="session")
def shared_exports(request, tmp_path_factory) -> SharedExports:
    needed = request.config.stash.get(_NEEDED, [])
    return SharedExports(_shared_root(tmp_path_factory) / "exports", needed)


def _export_fixture(name: str):
    def fixture(shared_exports: SharedExports, request) -> Path:
        return shared_exports.get(name, request)

    fixture.__doc__ = EXPORTS[name].doc
    return pytest.fixture(scope="session", name=f"export_{name}")(fixture)


for _name in EXPORTS:
    globals()[f"export_{_name}"] = _export_fixture(_name)
