"""ExecuTorch's own LLM runner (``TextLLMRunner``) runs our programs: base and every adapter,
with the foundation as its data file, generating the same greedy tokens as our decode loop."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from edgelora.errors import ProgramError
from edgelora.runtime.cli import main as run_main
from edgelora.runtime.program import LlamaProgram
from edgelora.runtime.text import generate_text, resolve_program
from edgelora.runtime.tokenizer import write_char_tokenizer

PROMPT = "the lazy fox"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, export_8da4w):
    vocab = LlamaProgram(export_8da4w / "base.pte", export_8da4w / "foundation.ptd").metadata[
        "get_vocab_size"
    ]
    return write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab)


@pytest.mark.parametrize("name", ["base", "chat", "code"])
def test_runner_generates_our_greedy_tokens(export_8da4w, tokenizer, name):
    pte, ptd = resolve_program(export_8da4w, None if name == "base" else name)
    gen = generate_text(pte, tokenizer, ptd, PROMPT, max_new_tokens=12)
    tok = Tokenizer.from_file(str(tokenizer))
    ids = tok.encode(PROMPT).ids
    assert gen.prompt_tokens == len(ids)
    ours = LlamaProgram(pte, ptd).generate(ids, 12).tokens
    if EOS in ours:  # the runner stops at EOS
        ours = ours[: ours.index(EOS) + 1]
    # the runner prints special tokens (EOS) as their text
    assert gen.pieces == [tok.decode([t], skip_special_tokens=False) for t in ours]
    assert len(gen.pieces) >= 1


def test_adapters_change_the_text(export_8da4w, tokenizer):
    texts = {}
    for name in ("base", "chat"):
        pte, ptd = resolve_program(export_8da4w, None if name == "base" else name)
        texts[name] = generate_text(pte, tokenizer, ptd, PROMPT, 12).text
    # Not required in general, but these fixture adapters change greedy tokens (see
    # test_session's diff_from_base); a runner that ignored the adapter would fail here.
    assert texts["base"] != texts["chat"]


def test_run_cli_text_mode(export_8da4w, tokenizer, capsys):
    argv = [str(export_8da4w), "--adapter", "chat", "--prompt", PROMPT, "--tokenizer"]
    assert run_main(argv + [str(tokenizer), "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["program"].endswith("chat.pte") and result["prompt"] == PROMPT
    assert result["generated_tokens"] >= 1 and result["time_to_first_token_ms"] >= 0
    assert (
        run_main(
            [str(export_8da4w), "--adapter", "nope", "--prompt", "x", "--tokenizer", str(tokenizer)]
        )
        == 2
    )
    assert "no program 'nope' (have: base, chat, code)" in capsys.readouterr().err
    assert run_main([str(export_8da4w), "--prompt", "x"]) == 2
    assert "the export ships no tokenizer" in capsys.readouterr().err
    assert run_main([str(export_8da4w / "base.pte"), "--prompt", "x"]) == 2
    assert "--prompt needs --tokenizer" in capsys.readouterr().err
    with pytest.raises(ProgramError, match="tokenizer file not found"):
        generate_text(export_8da4w / "base.pte", export_8da4w / "nope.json", None, "x", 2)
