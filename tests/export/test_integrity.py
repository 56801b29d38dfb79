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

import torch

from edgelora.backends.xnnpack.files import read_ptd, read_pte
from edgelora.export.config import ExportConfig
from edgelora.export.pipeline import run_export
from edgelora.models.adapters import Adapter, LoRAWeights, adapter_attached
from edgelora.models.llama import build_model
from edgelora.runtime.session import LlamaProgram


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
    cfg = ExportConfig(model_args=tiny_args, output_dir=tmp_path / "out", qmode="none")
    result = run_export(cfg, [twin], log=lambda _: None)  # checks base/twin foundations equal
    out = tmp_path / "out"
    entry = result.manifest["programs"]["twin"]
    assert entry["adapter_constants_in_foundation"] == [
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
    foundations (the other export also had adapters, --bundle and --switchable)."""
    for name in ("base.pte", "foundation.ptd"):
        a, b = (export_8da4w / name).read_bytes(), (export_8da4w_base_only / name).read_bytes()
        assert a == b, name


def _complete(out: Path) -> bool:
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
    """SIGKILL at several stages of an export over a previous complete output: the output
    directory is always the previous export, complete, or (killed between the two renames
    of the final swap) absent; never a partial file under a final name. (That a complete
    re-run writes the same bytes is test_exports_are_deterministic.)"""
    out = tmp_path / "out"
    shutil.copytree(export_8da4w_base_only, out)
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "edgelora.export.cli",
        "--params",
        str(params_file),
        "--output-dir",
        str(out),
        "--embedding-bits",
        "4",
        "--embedding-group-size",
        "32",
    ]
    # Kill when the export prints the start of each of these stages.
    stages = [
        "[build + quantize foundation] ...",
        "[base: torch.export] ...",
        "[base: lower to XNNPACK + serialise] ...",
        "[write manifest + move into place] ...",
    ]
    for stage in stages:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == stage:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "".join(seen)
        if out.exists():
            assert _complete(out), stage
            assert {p.name: p.read_bytes() for p in out.iterdir()} == previous, stage
        finals = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert finals == ([out] if out.exists() else []), stage
