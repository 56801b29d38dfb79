"""Hostile export directories: a manifest, a lock, a temporary file or an input written to do
harm. Each reader (``edgelora-run``) and writer (``export_llama --add-to``) gives one clear
line and exit 2, and nothing is written or deleted outside the export (a file beside it, the
victim, keeps its bytes; the directory around it gains nothing). Companion of
``test_bad_input_corpus.py`` (broken inputs); ``bench/fuzz.py`` fuzzes the same readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edgelora.export.cli import main as export_main
from edgelora.runtime.cli import main as run_main

VICTIM = b"a file outside the export that nothing may touch\n"


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def hostile(tmp_path, export_8da4w_slots):
    """``(out, victim)``: a copy of the chat export (switchable, template.pte), and a file
    beside it."""
    out = tmp_path / "out"
    shutil.copytree(export_8da4w_slots, out)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    return out, victim


def _edit(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def _one_line_exit_2(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def _point(field_path: list, name):
    def change(m):
        d = m
        for key in field_path[:-1]:
            d = d[key]
        d[field_path[-1]] = name
        if field_path[0] != "files":
            m["files"][name] = m["files"]["chat.pte"]

    return change


MANIFEST_CASES = {
    # a program whose file climbs out of the export: remove would delete it, run would load it
    "dotdot-program": (lambda v: _point(["programs", "chat", "file"], f"../{v.name}"), "../"),
    "absolute-program": (lambda v: _point(["programs", "chat", "file"], str(v)), "victim"),
    "dotdot-inputs": (
        lambda v: _point(["switchable", "adapters", "chat"], f"../{v.name}"),
        "not a plain file name",
    ),
    "subdir-file": (lambda v: _point(["programs", "chat", "file"], "a/chat.pte"), "a/chat.pte"),
    "hidden-file": (lambda v: _point(["programs", "chat", "file"], ".x.pte"), ".x.pte"),
    "unlisted-file": (
        lambda v: lambda m: m["programs"]["chat"].update(file="nope.pte"),
        "not one of the files it lists",
    ),
    "negative-slot": (
        lambda v: lambda m: m["switchable"]["slots"][0].update(rank=-1),
        "'rank' -1",
    ),
    "huge-slot": (
        lambda v: lambda m: m["switchable"]["slots"][0].update(out=10**12),
        "'out' 1000000000000",
    ),
    "bool-slot": (lambda v: lambda m: m["switchable"]["slots"][0].update(rank=True), "'rank'"),
    "slot-module-path": (
        lambda v: lambda m: m["switchable"]["slots"][0].update(module="../x"),
        "not a module name",
    ),
    "bad-sha": (
        lambda v: lambda m: m["files"]["chat.pte"].update(sha256="../../x"),
        "valid size and sha256",
    ),
    "no-foundation": (lambda v: lambda m: m["files"].pop("foundation.ptd"), "foundation.ptd"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_hostile_manifest_names_and_values(case, hostile, capfd):
    out, victim = hostile
    make, words = MANIFEST_CASES[case]
    _edit(out, make(victim))
    before = _tree(out.parent)
    for argv, tool in (
        (["--add-to", str(out), "--remove", "chat"], export_main),
        ([str(out), "--adapter", "chat", "--prompt-ids", "1,2", "--max-new-tokens", "1"], run_main),
    ):
        code = tool(argv)
        _one_line_exit_2(code, capfd.readouterr().err, words)
        assert _tree(out.parent) == before and victim.read_bytes() == VICTIM


def test_a_listed_file_that_is_a_symlink_is_refused(hostile, capfd):
    """``chat.pte`` replaced by a symlink to a file outside (with the manifest's sha256 made
    to match it): a regular file is required, so neither run nor remove follows it."""
    out, victim = hostile
    (out / "chat.pte").unlink()
    (out / "chat.pte").symlink_to(victim)
    sha = hashlib.sha256(VICTIM).hexdigest()
    _edit(out, lambda m: m["files"]["chat.pte"].update(sha256=sha, size=len(VICTIM)))
    before = _tree(out.parent)
    assert export_main(["--add-to", str(out), "--remove", "chat"]) == 2
    _one_line_exit_2(2, capfd.readouterr().err, "not a regular file")
    assert run_main([str(out), "--adapter", "chat", "--prompt-ids", "1"]) == 2
    _one_line_exit_2(2, capfd.readouterr().err, "not a regular file")
    assert _tree(out.parent) == before and victim.read_bytes() == VICTIM


@pytest.mark.parametrize(
    "name", ["template", "switchable", "bundle", "base", "foundation", "manifest", "chat\n"]
)
def test_reserved_and_newline_ended_adapter_names(name, hostile, adapter_dirs, capfd):
    """``--lora template=DIR`` would have replaced template.pte without --overwrite."""
    out, _ = hostile
    before = _tree(out.parent)
    code = export_main(["--add-to", str(out), "--lora", f"{name}={adapter_dirs['code']}"])
    _one_line_exit_2(code, capfd.readouterr().err, "adapter name")
    assert _tree(out.parent) == before


def test_symlinked_lock_is_refused_and_its_target_untouched(hostile, capfd):
    out, victim = hostile
    (out.parent / ".out.lock").symlink_to(victim)
    before = _tree(out.parent)
    code = export_main(["--add-to", str(out), "--remove", "chat"])
    _one_line_exit_2(code, capfd.readouterr().err, ".out.lock", "symlink")
    assert _tree(out.parent) == before and victim.read_bytes() == VICTIM


def test_planted_temporary_files_are_not_followed(hostile, capfd):
    """Symlinks to the victim where a writer makes its temporary files: the writer replaces
    them, never writes through them, and the export it leaves is complete."""
    from edgelora.format.manifest import read_export

    out, victim = hostile
    (out / ".manifest.json.tmp").symlink_to(victim)
    staging = out.parent / ".out.staging-planted"
    staging.mkdir()
    (staging / "stage").symlink_to(victim)
    assert export_main(["--add-to", str(out), "--remove", "chat"]) == 0
    capfd.readouterr()
    assert victim.read_bytes() == VICTIM
    assert "chat" not in read_export(out).programs  # verified: every file its manifest's
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "victim.txt"]


def test_symlinked_output_directory_is_refused_for_writers(hostile, tmp_path, capfd):
    """A writer given a symlink to a directory says so (it would write beside the link, or
    swap the link away); a reader follows it."""
    out, _ = hostile
    link = tmp_path / "alias"
    link.symlink_to(out)
    before = _tree(tmp_path)
    code = export_main(["--add-to", str(link), "--remove", "chat"])
    _one_line_exit_2(code, capfd.readouterr().err, "is a symlink")
    assert _tree(tmp_path) == before
    assert run_main([str(link), "--prompt-ids", "1", "--max-new-tokens", "1"]) == 0


def test_aliases_through_a_symlinked_parent_share_one_lock(hostile, tmp_path):
    from edgelora.export.output import lock_file, real_out_dir

    out, _ = hostile
    (tmp_path / "parent-alias").symlink_to(tmp_path)
    alias = tmp_path / "parent-alias" / "sub" / ".." / "out"
    (tmp_path / "sub").mkdir()
    assert lock_file(real_out_dir(alias)) == lock_file(real_out_dir(out))


JSON_BOMBS = {
    "digits": b'{"format": "edgelora-export/1", "seed": 1' + b"7" * 5000 + b"}",
    "nesting": b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "oversized": b"{" + b" " * (17 << 20) + b"}",
    "not-utf8": b'{"model": "\xff\xfe"}',
}


@pytest.mark.parametrize("bomb", sorted(JSON_BOMBS))
def test_json_bombs_in_the_manifest(bomb, hostile, capfd):
    out, _ = hostile
    (out / "manifest.json").write_bytes(JSON_BOMBS[bomb])
    before = _tree(out.parent)
    code = run_main([str(out), "--prompt-ids", "1"])
    _one_line_exit_2(code, capfd.readouterr().err, "manifest.json")
    code = export_main(["--add-to", str(out), "--remove", "chat"])
    _one_line_exit_2(code, capfd.readouterr().err, "manifest.json")
    assert _tree(out.parent) == before


@pytest.mark.parametrize("bomb", ["digits", "nesting"])
@pytest.mark.parametrize("file", ["params", "adapter_config"])
def test_json_bombs_in_inputs(bomb, file, params_file, adapter_dirs, tmp_path, capfd):
    params, adapter = tmp_path / "params.json", tmp_path / "adapter"
    shutil.copy(params_file, params)
    shutil.copytree(adapter_dirs["chat"], adapter)
    target = params if file == "params" else adapter / "adapter_config.json"
    target.write_bytes(JSON_BOMBS[bomb])
    out = tmp_path / "out"
    code = export_main(
        ["--params", str(params), "--lora", f"chat={adapter}", "--output-dir", str(out)]
    )
    _one_line_exit_2(code, capfd.readouterr().err, target.name)
    assert not out.exists()


def test_catastrophic_target_regex_is_bounded(
    adapter_dirs, params_file, tmp_path, monkeypatch, capfd
):
    """``(m|m)*x``-style patterns from an adapter config: the match is bounded (the ``regex``
    engine with a timeout), so the export ends in seconds with one line, whether the engine
    matches fast or times out (forced here with a timeout of a microsecond)."""
    from edgelora.weights import peft_config

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dirs["chat"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = "(.*|.*)*(q_proj|m)+(m|m)*x"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    argv = ["--params", str(params_file), "--lora", f"chat={adapter}", "--output-dir", str(out)]
    t = time.perf_counter()
    code = export_main(argv)
    _one_line_exit_2(code, capfd.readouterr().err, "adapter_config.json")
    assert time.perf_counter() - t < 60
    monkeypatch.setattr(peft_config, "REGEX_TIMEOUT_S", 1e-6)
    cfg["target_modules"] = "((" + "|".join(f"a{i}.*" for i in range(200)) + ")*)*x"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code = export_main(argv)
    _one_line_exit_2(code, capfd.readouterr().err, "catastrophic regex")
    assert not out.exists()


def _strip_checksums(src: Path, dst: Path) -> None:
    """``src`` with its two checksum methods renamed (same length), as a tool stripping them
    would leave it: a valid program that records nothing."""
    data = src.read_bytes()
    for name in (b"get_foundation_sha256", b"get_program_sha256"):
        assert data.count(name) == 1
        data = data.replace(name, name.replace(b"get_", b"xxx_"))
    dst.write_bytes(data)


def test_program_with_checksums_stripped_needs_allow_unverified(export_8da4w, tmp_path, capfd):
    bare = tmp_path / "bare.pte"
    _strip_checksums(export_8da4w / "chat.pte", bare)
    argv = [str(bare), "--data", str(export_8da4w / "foundation.ptd"), "--prompt-ids", "1,2"]
    code = run_main([*argv, "--max-new-tokens", "1"])
    _one_line_exit_2(code, capfd.readouterr().err, "no edgelora checksums", "--allow-unverified")
    assert run_main([*argv, "--max-new-tokens", "1", "--allow-unverified"]) == 0


def test_tampered_tokenizer_and_adapter_inputs_are_refused(
    export_fam_qwen3, hostile, tmp_path, capfd
):
    """Every file a manifest lists is verified before use, not only programs."""
    fam = tmp_path / "fam"
    shutil.copytree(export_fam_qwen3, fam)
    tok = json.loads((fam / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<evil>"
    (fam / "tokenizer.json").write_text(json.dumps(tok))
    code = run_main([str(fam), "--prompt", "hi", "--max-new-tokens", "1"])
    _one_line_exit_2(code, capfd.readouterr().err, "tokenizer.json was altered")
    out, _ = hostile
    inputs = out / "chat.lora.safetensors"
    data = bytearray(inputs.read_bytes())
    data[-1] ^= 1
    inputs.write_bytes(bytes(data))
    code = run_main([str(out), "--adapters", "chat", "--prompt-ids", "1", "--max-new-tokens", "1"])
    _one_line_exit_2(code, capfd.readouterr().err, "chat.lora.safetensors was altered")
