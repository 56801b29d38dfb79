"""``edgelora-eval --chat``: task prompts are user messages rendered with the export's chat
template before encoding, so the program is scored on what a chat user sends it."""

from __future__ import annotations

import json

from edgelora.format.chat_template import ChatTemplate
from edgelora.quality.cli import main as eval_main
from edgelora.quality.scoring import encode_set
from edgelora.quality.tasks import as_chat, read_eval_file


def test_chat_prompts_are_rendered_with_the_exports_template(export_fam_qwen3, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "fox", "answer": "dog"}) + "\n")
    template = ChatTemplate.of_dir(export_fam_qwen3)
    rendered = as_chat(read_eval_file(task), template)
    assert rendered.examples[0].prompt == (
        "<|im_start|>user\nfox<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered.examples[0].answer == "dog"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(export_fam_qwen3 / "tokenizer.json"))
    enc = encode_set(rendered, tok, "")[0]
    assert enc.ids == tok.encode(rendered.examples[0].prompt + "dog").ids
    assert eval_main([str(export_fam_qwen3), str(task), "--chat", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["runtime"]["examples"] == 1
    # perplexity is over the answer's tokens after the rendered prompt: 3 of them
    assert rows[0]["runtime"]["scored_tokens"] == 3


def test_chat_without_a_template_is_refused(export_fp32, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    from edgelora.runtime.tokenizer import write_char_tokenizer

    vocab = json.loads((export_fp32 / "manifest.json").read_text())["model"]["vocab_size"]
    tok = write_char_tokenizer(tmp_path / "tok.json", vocab)
    argv = [str(export_fp32), str(task), "--chat", "--no-progress", "--tokenizer", str(tok)]
    assert eval_main(argv) == 1
    assert "--chat needs a chat template" in capsys.readouterr().err
