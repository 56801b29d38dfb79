"""The matrix of exports every test that needs one reuses, and the make-once machinery.

Lowering costs seconds per program even for one layer, so each export in :data:`EXPORTS` is
made once per test run and read by every test that needs it -- also across pytest-xdist
workers (ci/setup.sh runs two): exports live in a directory the workers share, each made
under its own file lock. A worker that needs an export another worker is making does not sit
idle: it makes one of the others this session needs first (work stealing), so both cores
lower programs until the matrix is done. The fixtures (``export_NAME``) are in conftest.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .hf_fixtures import FAMILIES

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


def shared_root(tmp_path_factory) -> Path:
    """The directory every worker of this run shares."""
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
    root = shared_root(tmp_path_factory)
    _try_make(root, name, make, wait=True)
    return root / name


def once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """A directory ``make(dir)`` fills once per test run, whichever worker asks first."""
    root = shared_root(tmp_path_factory)
    _try_make(root, name, make, wait=True)
    return root / name


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
