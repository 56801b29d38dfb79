"""Exported programs on the ExecuTorch runtime vs their eager models, and edgelora-run."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from edgelora.ci.output_match import main as output_match_main
from edgelora.ci.output_match import match_export
from edgelora.errors import ProgramError
from edgelora.runtime.cli import main as run_main
from edgelora.runtime.program import LlamaProgram


def test_programs_match_eager(export_8da4w, export_8da4w_base_only, export_fp32, tmp_path, capsys):
    """Every program against its eager model (``ci/output_match``, the check ``ci/test_lora.sh``
    runs, through its CLI for the 8da4w export: the base-only export's foundation is
    byte-identical and every adapter program gives identical logits with it)."""
    figures = tmp_path / "match.json"
    argv = [str(export_8da4w), "--base-export", str(export_8da4w_base_only), "--json", str(figures)]
    assert output_match_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS foundation.ptd byte-identical")
    assert sum(line.startswith("PASS ") and "max abs diff" in line for line in lines) == 3
    assert not any(line.startswith("FAIL") for line in lines)
    quantized = json.loads(figures.read_text())
    fp32 = [asdict(r) | {"ok": r.ok} for r in match_export(export_fp32)]
    for results, n in ((quantized, 3), (fp32, 2)):
        assert [r["name"] for r in results][0] == "base" and len(results) == n
        for r in results:
            assert r["ok"] and r["loads_with_foundation"], r
            if r["diff_from_base"] is not None:
                assert r["diff_from_base"] > 1e-2  # the adapter changes the logits
    assert max(r["max_abs_diff"] for r in fp32) < 1e-4


def test_attention_kernels_in_programs(export_8da4w, export_fp32):
    """--sdpa custom (default) programs call ExecuTorch's in-place cache + SDPA kernels; --sdpa
    plain ones do not. (Both match their eager models in test_programs_match_eager, and
    tests/export/test_fuse.py compares a custom fp32 program with a plain one at 1e-4.)"""
    for name in ("base", "chat"):
        custom = (export_8da4w / f"{name}.pte").read_bytes()
        plain = (export_fp32 / f"{name}.pte").read_bytes()
        assert b"llama::update_cache" in custom and b"llama::custom_sdpa" in custom
        assert b"llama::" not in plain
    assert json.loads((export_8da4w / "manifest.json").read_text())["sdpa"] == "custom"
    assert json.loads((export_fp32 / "manifest.json").read_text())["sdpa"] == "plain"


def test_generate_and_metadata(export_8da4w):
    prog = LlamaProgram(export_8da4w / "chat.pte", export_8da4w / "foundation.ptd")
    assert prog.metadata["get_max_seq_len"] == 48 and prog.metadata["get_vocab_size"] == 96
    gen = prog.generate([1, 2, 3], 5)
    assert len(gen.tokens) == 5 and gen.prompt_logits.shape == (3, 96)
    assert len(gen.decode_s) == 4 and gen.prefill_tokens_per_s > 0
    with pytest.raises(ProgramError, match="outside the vocabulary"):
        prog.generate([1, 500], 2)
    with pytest.raises(ProgramError, match="max_seq_len 48"):
        prog.forward(list(range(40)), 20)


def test_cli_json_and_logits(export_8da4w, tmp_path, capsys):
    npy = tmp_path / "logits.npy"
    code = run_main(
        [
            str(export_8da4w / "base.pte"),
            "--data",
            str(export_8da4w / "foundation.ptd"),
            "--prompt-ids",
            "1,2,3,4",
            "--max-new-tokens",
            "6",
            "--json",
            "--logits-out",
            str(npy),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["tokens"]) == 6 and result["prefill_tokens_per_s"] > 0
    assert result["decode_ms_per_token"] > 0
    logits = np.load(npy)
    assert logits.shape == (4, 96) and logits.dtype == np.float32
    assert result["tokens"][0] == int(logits[-1].argmax())


def test_cli_errors_are_one_line(export_8da4w, export_fp32, capsys):
    assert (
        run_main(
            [
                str(export_8da4w / "chat.pte"),
                "--data",
                str(export_fp32 / "foundation.ptd"),
                "--prompt-ids",
                "1,2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    # the pairing check names both hashes before the runtime tries the keys
    assert "was exported with a foundation of sha256" in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert run_main([str(export_8da4w / "nope.pte"), "--prompt-ids", "1"]) == 2
    assert "program file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_main([str(export_8da4w / "base.pte"), "--prompt-ids", "a,b"])
    assert info.value.code == 2
