"""export_llama: outputs, manifest, and bad input (fails fast, one line, nothing written)."""

import json
import subprocess
import sys

import pytest

from edgelora.export.cli import build_parser, main
from edgelora.format.layout import sha256_file


def test_manifest_describes_the_files(export_8da4w, tiny_args):
    manifest = json.loads((export_8da4w / "manifest.json").read_text())
    on_disk = sorted(p.name for p in export_8da4w.iterdir())
    assert on_disk == [
        "base.pte",
        "chat.lora.safetensors",
        "chat.pte",
        "code.lora.safetensors",
        "code.pte",
        "foundation.ptd",
        "manifest.json",
        "switchable.pte",
    ]
    assert manifest["bundle"] is None
    assert manifest["switchable"]["adapters"] == {
        "chat": "chat.lora.safetensors",
        "code": "code.lora.safetensors",
    }
    for name, entry in manifest["files"].items():
        assert entry["size"] == (export_8da4w / name).stat().st_size
        assert entry["sha256"] == sha256_file(export_8da4w / name)
    assert set(manifest["programs"]) == {"base", "chat", "code"}
    for prog in manifest["programs"].values():
        assert prog["foundation"] == "foundation.ptd"
        assert prog["foundation_sha256"] == manifest["files"]["foundation.ptd"]["sha256"]
    assert manifest["programs"]["code"]["adapter"]["ranks"] == [8]
    assert manifest["model"]["dim"] == tiny_args.dim
    q = manifest["quantization"]
    assert (q["qmode"], q["group_size"], q["embedding_bits"]) == ("8da4w", 32, 4)
    assert q["quantized_linears"] == 7 * tiny_args.n_layers + 1  # + output


def test_adapter_program_size_is_close_to_adapter_bytes(export_8da4w, adapter_dirs, tiny_args):
    from edgelora.weights.adapter_files import load_adapter

    base = (export_8da4w / "base.pte").stat().st_size
    for name in ("chat", "code"):
        extra = (export_8da4w / f"{name}.pte").stat().st_size - base
        weights = load_adapter(adapter_dirs[name], tiny_args, name).num_bytes
        # The program grows by its adapter's weights plus graph overhead for the extra nodes.
        assert weights <= extra <= weights + 64 * 1024, (name, extra, weights)


def test_help_explains_every_flag():
    text = build_parser().format_help()
    for flag in (
        "--params",
        "--checkpoint",
        "--lora",
        "--qmode",
        "--group-size",
        "--max-seq-len",
        "--output-dir",
        "--overwrite",
        "--seed",
        "--embedding-bits",
        "--embedding-group-size",
        "--logits",
    ):
        assert flag in text
    out = subprocess.run(
        [sys.executable, "-m", "edgelora.export.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "foundation.ptd" in out.stdout


def test_last_logits_program_returns_the_last_position(export_fp32_last, export_fp32):
    """``--logits last``: forward returns the last position's logits, equal (fp32, 1e-5: the
    same XNNPACK kernels on the same row) to that row of the full-logits program; the weights,
    and so the foundation, are the same bytes; decoding gives the same tokens; output match
    passes. (Adapter programs are built the same way: the logits mode is a model setting.)"""
    from edgelora.ci.output_match import match_export
    from edgelora.runtime.program import LlamaProgram

    out = export_fp32_last
    assert json.loads((out / "manifest.json").read_text())["logits"] == "last"
    assert (out / "foundation.ptd").read_bytes() == (export_fp32 / "foundation.ptd").read_bytes()
    prompt = [1, 5, 9, 2, 33, 7]
    for name in ("base",):
        last = LlamaProgram(out / f"{name}.pte", out / "foundation.ptd")
        full = LlamaProgram(export_fp32 / f"{name}.pte", export_fp32 / "foundation.ptd")
        got, want = last.forward(prompt, 0), full.forward(prompt, 0)
        assert got.shape == (1, want.shape[-1]) and want.shape[0] == len(prompt)
        assert (got[0] - want[-1]).abs().max().item() <= 1e-5, name
        assert last.generate(prompt, 8).tokens == full.generate(prompt, 8).tokens
    results = match_export(out)
    assert [r.name for r in results] == ["base"]
    assert all(r.ok for r in results), results


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def _no_leftovers(root):
    return [p.name for p in root.iterdir()]


def test_bad_inputs(tmp_path, params_file, adapter_dirs, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # ExecuTorch's parser rejects it
    metaspace = tmp_path.parent / f"{tmp_path.name}-metaspace.json"
    tok.save(str(metaspace))
    out = tmp_path / "out"
    base = ["--params", str(params_file), "--output-dir", str(out)]
    cases = [
        (
            ["--params", str(tmp_path / "none.json"), "--output-dir", str(out)],
            "params file not found",
        ),
        (base + ["--lora", str(tmp_path / "missing")], "adapter directory not found"),
        (base + ["--checkpoint", str(tmp_path / "none.pth")], "checkpoint not found"),
        (base + ["--group-size", "48"], "use 0 (per channel) or a multiple of 32"),
        (base + ["--group-size", "128"], "group_size 128 divides no linear"),
        (
            base + ["--lora", f"x={adapter_dirs['chat']}", "--lora", f"x={adapter_dirs['code']}"],
            "adapter names must be unique",
        ),
        (base + ["--lora", f"../evil={adapter_dirs['chat']}"], "not allowed"),
        (base + ["--tokenizer", str(metaspace)], "Unsupported PreTokenizer type: Metaspace"),
        (base + ["--tokenizer", str(tmp_path / "none.json")], "tokenizer file not found"),
        (base + ["--eos-id", "500"], "special token ids must be in [0, 96)"),
        (base + ["--adapter-template"], "--adapter-template writes a program with switchable"),
        (
            base + ["--switchable", "--adapter-template", "--dtype", "fp16"],
            "--adapter-template with --dtype fp16",
        ),
    ]
    for argv, message in cases:
        code, err = _run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert err.count("\n") == 1
    assert _no_leftovers(tmp_path) == []  # nothing written, no temp dirs left behind


def test_adapter_for_another_model_fails_before_export(tmp_path, adapter_dirs, capsys):
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 96}))
    code, err = _run(
        [
            "--params",
            str(params),
            "--output-dir",
            str(tmp_path / "o"),
            "--lora",
            f"chat={adapter_dirs['chat']}",
        ],
        capsys,
    )
    assert code == 2 and "layers.0.attention" in err and "lora_A must be" in err
    assert sorted(_no_leftovers(tmp_path)) == ["p.json"]


def test_output_dir_with_other_files_is_refused(tmp_path, params_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _run(["--params", str(params_file), "--output-dir", str(out)], capsys)
    assert code == 2 and "not an edgelora export" in err
    assert _no_leftovers(out) == ["notes.txt"]


@pytest.mark.parametrize(
    "text, name, path, scale",
    [
        ("a=/x/y", "a", "/x/y", 1.0),
        ("/x/my_adapter/", "my_adapter", "/x/my_adapter/", 1.0),
        ("a=/x/y:scale=0.5", "a", "/x/y", 0.5),
        ("/x/c:d:scale=-2", "c:d", "/x/c:d", -2.0),
    ],
)
def test_lora_flag_parsing(text, name, path, scale):
    from edgelora.export.config import AdapterSpec

    spec = AdapterSpec.parse(text)
    assert (spec.name, str(spec.path), spec.scale) == (name, path.rstrip("/") or path, scale)


def test_special_token_flags_override_the_checkpoint(tiny_args, tmp_path):
    """--bos-id/--eos-id win over what the checkpoint says; without them the checkpoint's
    tokens (all of a list eos) are used, else 1 / [2]."""
    from edgelora.export.cli import config_from_args
    from edgelora.weights.checkpoint import Checkpoint

    ckpt = Checkpoint(tmp_path, "hf", {}, special_tokens={"bos_id": 3, "eos_ids": [7, 9]})
    argv = ["--params", "p.json", "--output-dir", str(tmp_path / "o")]
    ns = build_parser().parse_args(argv)
    cfg = config_from_args(ns, tiny_args, ckpt)
    assert (cfg.bos_id, cfg.eos_ids) == (3, (7, 9))
    ns = build_parser().parse_args(argv + ["--bos-id", "5", "--eos-id", "8", "--eos-id", "11"])
    cfg = config_from_args(ns, tiny_args, ckpt)
    assert (cfg.bos_id, cfg.eos_ids) == (5, (8, 11))
    cfg = config_from_args(build_parser().parse_args(argv), tiny_args, None)
    assert (cfg.bos_id, cfg.eos_ids, cfg.tokenizer_files) == (1, (2,), ())


def test_chat_template_found_overridden_and_checked(tmp_path, tiny_args, capsys):
    """The checkpoint directory's template travels (its end-of-turn token joins the EOS ids);
    --chat-template FILE wins; a template that does not parse fails before the first stage,
    naming the file and line."""
    from edgelora.export.cli import config_from_args
    from edgelora.runtime.tokenizer import write_char_tokenizer
    from edgelora.weights.checkpoint import Checkpoint

    from ..chat_templates import CHATML, GEMMA3
    from ..hf_fixtures import chat_tokens
    from ..tiny import TINY

    tokenizer = write_char_tokenizer(tmp_path / "tokenizer.json", tiny_args.vocab_size)
    chat_tokens(tokenizer)  # <|im_start|>, <|im_end|> as the last two ids
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    ckpt = Checkpoint(tmp_path, "hf", {}, special_tokens={"eos_ids": [2]})
    ckpt.tokenizer_files = [tokenizer]
    argv = ["--params", "p.json", "--output-dir", str(tmp_path / "o")]
    cfg = config_from_args(build_parser().parse_args(argv), tiny_args, ckpt)
    im_end = tiny_args.vocab_size - 1
    assert cfg.chat_template == CHATML and cfg.eos_ids == (2, im_end)
    assert cfg.chat_template_source == str(tmp_path / "chat_template.jinja")
    other = tmp_path / "gemma.jinja"
    other.write_text(GEMMA3)
    cfg = config_from_args(
        build_parser().parse_args([*argv, "--chat-template", str(other)]), tiny_args, ckpt
    )
    assert cfg.chat_template == GEMMA3 and cfg.eos_ids == (2,)  # no <end_of_turn> token here
    cfg = config_from_args(build_parser().parse_args([*argv, "--eos-id", "5"]), tiny_args, ckpt)
    assert cfg.eos_ids == (5,)  # --eos-id is taken as given
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ messages[0].content }}\n{% if x %}")
    params = tmp_path / "params.json"
    params.write_text(json.dumps(TINY))
    code = main(["--params", str(params), "--chat-template", str(broken),
                 "--output-dir", str(tmp_path / "o2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "broken.jinja: not a valid chat template (line 2" in err, err
    assert not (tmp_path / "o2").exists()
