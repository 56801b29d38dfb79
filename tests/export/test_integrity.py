"""Files we can trust: one file per key, deterministic output, and no partial output when an
export is killed."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgelora.errors import OutputError
from edgelora.export.config import ExportConfig, FoundationSpec
from edgelora.export.output import commit_output
from edgelora.export.pipeline import run_export
from edgelora.format.manifest import Manifest
from edgelora.format.pte import read_ptd, read_pte
from edgelora.lora.attach import adapter_attached
from edgelora.lora.record import Adapter, LoRAWeights
from edgelora.models.llama import build_model
from edgelora.runtime.program import LlamaProgram


def test_adapter_tensors_equal_to_foundation_tensors_live_in_one_file(tmp_path, tiny_args):
    """XNNPACK keys a constant by the sha256 of its bytes, so an adapter matrix equal to a
    base weight byte for byte is the same key. It must not be dropped from the foundation (the
    foundation would then differ from the base export's) nor stored twice."""
    model = build_model(tiny_args, seed=0)
    att = model.layers[0].attention
    wk, wv = att.wk.weight.detach().clone(), att.wv.weight.detach().clone()  # [32, 64] each
    rank = wk.shape[0]
    twin = Adapter(
        "twin",
        {
            "layers.0.attention.wq": LoRAWeights(wk.clone(), torch.zeros(64, rank), 32.0),
            "layers.0.attention.wo": LoRAWeights(wv.clone(), torch.randn(64, rank) * 0.01, 32.0),
        },
    )
    spec = FoundationSpec.resolve(qmode="none")
    cfg = ExportConfig(model_args=tiny_args, output_dir=tmp_path / "out", foundation=spec)
    result = run_export(cfg, [twin], log=lambda _: None)  # checks base/twin foundations equal
    out = tmp_path / "out"
    entry = result.manifest.programs["twin"]
    assert entry.adapter_constants_in_foundation == [
        "layers.0.attention.wo.lora_a.weight",
        "layers.0.attention.wq.lora_a.weight",
    ]
    ptd = set(read_ptd(out / "foundation.ptd"))
    info = read_pte(out / "twin.pte")
    assert len(info.inline) == 2  # the two lora_b matrices
    assert set(info.inline).isdisjoint(ptd) and info.needed <= ptd
    got = LlamaProgram(out / "twin.pte", out / "foundation.ptd").forward([1, 2, 3], 0)
    with adapter_attached(model, twin), torch.no_grad():
        model.reset_cache()
        want = model(torch.tensor([[1, 2, 3]]), torch.tensor([0]))[0]
    assert (got - want).abs().max().item() < 1e-4  # fp32 program vs fp32 eager


def test_exports_are_deterministic(export_8da4w, export_8da4w_base_only):
    """Two runs with the same foundation settings write byte-identical base programs and
    foundations (the other export also had adapters and --switchable)."""
    for name in ("base.pte", "foundation.ptd"):
        a, b = (export_8da4w / name).read_bytes(), (export_8da4w_base_only / name).read_bytes()
        assert a == b, name


def _complete(out: Path) -> bool:
    """Every file the manifest lists is there with its sha256, and nothing else is."""
    manifest = json.loads((out / "manifest.json").read_text())
    names = {p.name for p in out.iterdir()}
    if names != set(manifest["files"]) | {"manifest.json"}:
        return False
    return all(
        hashlib.sha256((out / n).read_bytes()).hexdigest() == e["sha256"]
        for n, e in manifest["files"].items()
    )


def test_killed_export_leaves_previous_output_or_nothing(
    tmp_path, params_file, export_8da4w_base_only
):
    """An export over a previous complete output, stopped (SIGSTOP) as it starts each stage --
    what a SIGKILL at that moment would leave on disk -- then killed at the last one: the output
    directory is always the previous export, complete, never a partial file under a final name;
    the staging directory is the only other entry. (That a complete re-run writes the same
    bytes is test_exports_are_deterministic.)"""
    out = tmp_path / "out"
    shutil.copytree(export_8da4w_base_only, out)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-u", "-m", "edgelora.export.cli", "--params", str(params_file)]
    cmd += ["--output-dir", str(out), "--embedding-bits", "4", "--embedding-group-size", "32"]
    stages = [
        "[build + quantize foundation] ...",
        "[base: torch.export] ...",
        "[base: lower to XNNPACK + serialise] ...",
        "[write manifest + move into place] ...",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, todo = [], list(stages)
    try:
        for line in proc.stdout:
            seen.append(line)
            if not todo or line.strip() != todo[0]:
                continue
            proc.send_signal(signal.SIGSTOP)
            stage = todo.pop(0)
            assert _complete(out), stage
            assert {p.name: p.read_bytes() for p in out.iterdir()} == previous, stage
            finals = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
            assert finals == [out], stage
            if not todo:
                proc.send_signal(signal.SIGKILL)
                break
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert not todo, f"stages not reached: {todo}\n{''.join(seen)}"
    assert proc.returncode == -signal.SIGKILL
    assert _complete(out) and {p.name: p.read_bytes() for p in out.iterdir()} == previous


def test_commit_refuses_another_foundation_unless_overwrite(tmp_path, export_fp32):
    """The last stage of an export replaces an existing export only if it holds the same
    foundation, or with --overwrite; refused, the previous export is untouched."""
    out = tmp_path / "out"
    shutil.copytree(export_fp32, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "base.pte").write_bytes(b"new")
    with pytest.raises(OutputError, match=r"different foundation .*--overwrite"):
        commit_output(stage, out, "0" * 64, overwrite=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    same = Manifest.read(out).foundation_sha256
    commit_output(stage, out, same, overwrite=False)  # the same foundation: replaced
    assert [p.name for p in out.iterdir()] == ["base.pte"]
    # swapped: the stage holds the previous export (the staging directory's removal drops it)
    assert sorted(p.name for p in stage.iterdir()) == sorted(before)
    shutil.rmtree(stage)
    stage.mkdir()
    (stage / "x.pte").write_bytes(b"x")
    commit_output(stage, out, "1" * 64, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["x.pte"]
