"""Chat with an export in its own template: the KV cache kept across turns (a turn feeds only
its new tokens and answers as a fresh prefill of the whole conversation would), adapter
switches starting over, and CLIs that print the conversation and nothing else."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from edgelora.errors import ProgramError
from edgelora.runtime.chat import Chat
from edgelora.runtime.cli import main as run_main

TURNS = ["fox", "a dog?"]  # short: one token per character, a 64-position context


def test_turns_feed_only_their_new_tokens(export_fam_qwen3):
    chat = Chat(export_fam_qwen3)
    replies = [chat.say(t, max_new_tokens=5) for t in TURNS]
    for i, reply in enumerate(replies):
        whole = chat.prompt_ids(chat.messages[: 2 * i + 1])
        # The first turn feeds the whole prompt; a later one what follows the common prefix of
        # the cache (the previous prompt and reply) and the re-encoded conversation: never
        # the previous prompt again. (This random model's replies hold special tokens the
        # text drops, so its replies re-encode differently: that part is fed again.)
        if i == 0:
            assert reply.fed == len(whole)
        else:
            before = chat.prompt_ids(chat.messages[: 2 * i - 1])
            cached = before + replies[i - 1].tokens
            keep = next(
                (k for k, (a, b) in enumerate(zip(cached, whole, strict=False)) if a != b),
                len(cached),
            )
            assert keep >= len(before) and reply.fed == len(whole) - keep, (i, reply.fed, keep)
        # The same turn answered from an empty cache, the whole conversation prefilled.
        fresh = Chat(export_fam_qwen3)
        fresh.messages = chat.messages[: 2 * i]
        again = fresh.say(TURNS[i], max_new_tokens=5)
        assert again.fed == len(whole)
        assert again.tokens == reply.tokens, i
    assert chat.messages[1]["content"] == replies[0].text
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    system = Chat(export_fam_qwen3, system="be brief")
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
    want += "<|im_start|>assistant\n"
    ids = system.prompt_ids([{"role": "user", "content": "x"}])
    assert ids == system.tokenizer.encode(want, add_special_tokens=False).ids


def test_switch_and_reset_start_over(export_fam_qwen3):
    chat = Chat(export_fam_qwen3)
    assert chat.adapters == ["lora"] and chat.session.mode == "programs"
    chat.say("the lazy fox", max_new_tokens=3)
    assert chat.context_used > 0
    chat.use_adapter("lora")
    assert chat.adapter == "lora" and chat.context_used == 0 and chat.messages == []
    reply = chat.say("the lazy fox", max_new_tokens=3)
    assert reply.fed == len(chat.prompt_ids(chat.messages[:1]))  # nothing of base's cache
    with pytest.raises(ProgramError, match=r"no adapter 'nope' in this export"):
        chat.use_adapter("nope")


def test_no_template_is_a_clear_error(export_fp32):
    with pytest.raises(ProgramError, match="carries no chat template"):
        Chat(export_fp32)


def test_overlong_conversation_is_refused(export_fam_qwen3):
    chat = Chat(export_fam_qwen3)
    with pytest.raises(ProgramError, match=r"context \d+: start a new one \(/reset\)"):
        chat.say("the lazy fox " * 200)


def test_run_chat_prints_only_the_answer(export_fam_qwen3, capfd):
    want = Chat(export_fam_qwen3).say("the lazy fox", max_new_tokens=5)
    capfd.readouterr()  # (this process's first program may have logged its CPU probe)
    assert run_main([str(export_fam_qwen3), "--chat", "the lazy fox", "--max-new-tokens", "5"]) == 0
    out, err = capfd.readouterr()
    assert out == want.text + "\n" and err == ""


def test_prompt_ids_stop_at_eos_unless_ignored(export_fam_qwen3, hf_families, capfd):
    import json

    import torch
    from tokenizers import Tokenizer

    from ..hf_fixtures import PROMPT_TEXT

    stop = torch.load(hf_families("qwen3") / "refs.pt")["greedy"]  # its last token is an EOS
    ids = Tokenizer.from_file(str(export_fam_qwen3 / "tokenizer.json")).encode(PROMPT_TEXT).ids
    argv = [str(export_fam_qwen3), "--prompt-ids", ",".join(map(str, ids)), "--json"]
    assert run_main([*argv, "--max-new-tokens", "8"]) == 0
    tokens = json.loads(capfd.readouterr().out)["tokens"]
    eos = json.loads((export_fam_qwen3 / "manifest.json").read_text())["eos_ids"]
    first = next(i for i, t in enumerate(stop) if t in eos)
    assert tokens == stop[: first + 1]
    assert run_main([*argv, "--max-new-tokens", "8", "--ignore-eos"]) == 0
    assert len(json.loads(capfd.readouterr().out)["tokens"]) == 8


def _cli(name, *args, stdin=""):
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_clis_print_no_native_log_lines(export_fam_qwen3, tmp_path):
    """A fresh process (ExecuTorch logs its CPU probe once per process, the LLM runner its
    PyTorchObserver stats per generation): stdout and stderr carry our lines only, and --log
    keeps the native ones."""
    log = tmp_path / "native.log"
    chat = _cli("edgelora-chat", str(export_fam_qwen3), "--max-new-tokens", "4", "--log",
                str(log), stdin="the lazy fox\n/adapter lora\nthe lazy fox\n/quit\n")  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2  # two replies
    assert re.fullmatch(r"\[adapter lora \(\d+ ms\); new conversation\]\n", chat.stderr)
    run = _cli(
        "edgelora-run", str(export_fam_qwen3), "--prompt", "the lazy fox", "--max-new-tokens", "4"
    )
    assert run.returncode == 0, run.stderr
    for text in (chat.stdout, chat.stderr, run.stdout, run.stderr):
        assert "PyTorchObserver" not in text and ".cpp:" not in text and ".h:" not in text, text
    assert "cpuinfo_utils.cpp" in log.read_text()
    assert len(run.stdout.splitlines()) >= 1 and "prompt tokens" in run.stderr
