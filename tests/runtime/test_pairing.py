"""A program records the sha256 of the foundation it was exported with (constant method
``get_foundation_sha256``, also in the manifest) and refuses any other data file before it
runs: a foundation with the same keys but other bytes would otherwise give wrong outputs."""

from __future__ import annotations

import json

import pytest

from edgelora.errors import ProgramError
from edgelora.format.layout import sha256_file
from edgelora.runtime.cli import main as run_main
from edgelora.runtime.program import LlamaProgram


@pytest.mark.parametrize(
    "export, programs",
    [
        ("export_8da4w", ("base.pte", "chat.pte", "switchable.pte")),
        ("export_fused", ("bundle.pte",)),
    ],
)
def test_program_records_its_foundation(request, export, programs):
    out = request.getfixturevalue(export)
    manifest = json.loads((out / "manifest.json").read_text())
    sha = manifest["files"]["foundation.ptd"]["sha256"]
    assert sha256_file(out / "foundation.ptd") == sha
    for pte in programs:
        method = "base" if pte == "bundle.pte" else "forward"
        program = LlamaProgram(out / pte, out / "foundation.ptd", method=method)
        assert program.recorded_foundation_sha() == sha, pte
        # the stamped program is what the manifest hashes
        assert manifest["files"][pte]["sha256"] == sha256_file(out / pte)


def test_wrong_foundation_is_refused_naming_both_hashes(
    export_8da4w, export_fp32, tmp_path, capsys
):
    want = sha256_file(export_8da4w / "foundation.ptd")
    # Same keys, other bytes: flip one byte near the end (tensor data, not the header).
    blob = bytearray((export_8da4w / "foundation.ptd").read_bytes())
    blob[-10] ^= 0xFF
    forged = tmp_path / "foundation.ptd"
    forged.write_bytes(bytes(blob))
    got = sha256_file(forged)
    for data in (forged, export_fp32 / "foundation.ptd"):
        with pytest.raises(ProgramError, match=rf"sha256 {want[:16]}\.\.\., but .* has sha256"):
            LlamaProgram(export_8da4w / "chat.pte", data)
    with pytest.raises(ProgramError, match="needs its foundation data file"):
        LlamaProgram(export_8da4w / "chat.pte", None)
    code = run_main([str(export_8da4w / "chat.pte"), "--data", str(forged), "--prompt-ids", "1,2"])
    err = capsys.readouterr().err
    assert code == 2 and want[:16] in err and got[:16] in err
    assert err.count("\n") == 1  # one line, no traceback


def test_corrupt_program_is_refused(export_8da4w, tmp_path):
    """A flipped byte anywhere in a program (here: in its inline adapter weights, which would
    otherwise run and give wrong outputs) fails its own checksum."""
    blob = bytearray((export_8da4w / "chat.pte").read_bytes())
    blob[int(len(blob) * 0.75)] ^= 0x01
    bad = tmp_path / "chat.pte"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ProgramError, match="corrupt program"):
        LlamaProgram(bad, export_8da4w / "foundation.ptd")
