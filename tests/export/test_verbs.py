"""``edgelora-add`` / ``edgelora-remove``, and ``export_llama --add-to`` as their alias: the same
export either way (every file byte-identical), the export's own flags refused or checked only
under the alias, and no private argparse access (``given_flags`` uses the public API)."""

from __future__ import annotations

import shutil
from importlib import import_module
from pathlib import Path

import pytest
import tomllib

from edgelora.export import cli, verbs

ROOT = Path(__file__).resolve().parents[2]


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_verbs_and_the_alias_make_the_same_export(tmp_path, export_8da4w_slots, adapter_dirs):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(export_8da4w_slots, d)
    code = f"code={adapter_dirs['code']}"
    assert verbs.add_main([str(a), "--lora", code]) == 0
    assert cli.main(["--add-to", str(b), "--lora", code]) == 0
    assert _bytes(a) == _bytes(b)
    assert {"code.pte", "code.lora.safetensors"} <= set(_bytes(a))
    assert verbs.remove_main([str(a), "code"]) == 0
    assert cli.main(["--add-to", str(b), "--remove", "code"]) == 0
    assert _bytes(a) == _bytes(b)
    assert "code.pte" not in _bytes(a)
    assert _bytes(a) == _bytes(export_8da4w_slots)  # back where it started


def test_the_alias_checks_the_export_flags_it_is_given(tmp_path, export_8da4w_slots, capsys):
    out = tmp_path / "out"
    shutil.copytree(export_8da4w_slots, out)
    before = _bytes(out)
    assert cli.main(["--add-to", str(out), "--lora", "x=/nonexistent", "--switchable"]) == 2
    assert "--switchable describes a whole export" in capsys.readouterr().err
    assert cli.main(["--add-to", str(out), "--lora", "x=/none", "--dtype", "fp16"]) == 2
    assert "--dtype fp16" in capsys.readouterr().err
    assert _bytes(out) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["OUT", "--lora", "a=/x", "--seed", "3"], "--seed needs the export's --params"),
        (["/nonexistent-export", "--lora", "a=/x"], "/nonexistent-export"),
    ],
)
def test_add_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert verbs.add_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("edgelora-add: error:")


def test_given_flags_are_those_on_the_command_line():
    parser = cli.build_parser()
    argv = ["--add-to", "o", "--lora", "a=d", "--dtype", "fp32", "--overwrite"]
    given = verbs.given_flags(parser, argv)
    assert given == {"add_to": Path("o"), "lora": ["a=d"], "dtype": "fp32", "overwrite": True}
    assert vars(parser.parse_args([]))["dtype"] == "fp32"  # the defaults are put back


def test_every_console_script_names_a_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"edgelora-add", "edgelora-remove", "export_llama"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), target
