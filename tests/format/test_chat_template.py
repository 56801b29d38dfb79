"""Our chat template rendering equals transformers' ``apply_chat_template`` on every family
fixture's template, read from either place a checkpoint keeps it; the end-of-turn token is
found by rendering; broken templates fail with one line naming the file."""

from __future__ import annotations

import json

import pytest

from edgelora.errors import ConfigError, ProgramError
from edgelora.format.chat_template import (
    CHAT_TEMPLATE_FILE,
    ChatTemplate,
    end_of_turn_ids,
    template_in,
)
from edgelora.runtime.tokenizer import write_char_tokenizer

from ..chat_templates import CONVERSATIONS, TEMPLATES


def _tokenizer_dir(root, family, in_config: bool):
    """A tokenizer directory as transformers saves it, with the family's template and special
    tokens; ``in_config``: the template in tokenizer_config.json instead of chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    text, specials, _ = TEMPLATES[family]
    path = write_char_tokenizer(root / "raw.json", 96)
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(path))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    hf.chat_template = text
    out = root / "tok"
    hf.save_pretrained(out)
    if in_config:
        (out / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = text
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return hf, out


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_render_equals_transformers(family, tmp_path):
    hf, out = _tokenizer_dir(tmp_path, family, in_config=sorted(TEMPLATES).index(family) % 2 == 0)
    ours = ChatTemplate.of_dir(out)
    assert ours is not None and ours.text == TEMPLATES[family][0]
    rendered = 0
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            try:
                want = hf.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=gen
                )
            except Exception as e:  # the template refuses this conversation: so must we
                with pytest.raises(ProgramError, match="the chat template failed"):
                    ours.render(conversation, add_generation_prompt=gen)
                assert "alternate" in str(e) or "roles" in str(e), (family, e)
                continue
            assert ours.render(conversation, add_generation_prompt=gen) == want, (family, gen)
            rendered += 1
    assert rendered >= 4, family  # most conversations render in every family


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_end_of_turn_token_found_by_rendering(family, tmp_path):
    hf, out = _tokenizer_dir(tmp_path, family, in_config=False)
    template = ChatTemplate.of_dir(out)
    want = hf.convert_tokens_to_ids(TEMPLATES[family][2])
    assert end_of_turn_ids(template, out / "tokenizer.json", ProgramError) == [want], family


def test_named_templates_and_absent_ones(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                      {"name": "default", "template": "D"}]})
    )  # fmt: skip
    assert template_in(tmp_path) == ("D", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert template_in(tmp_path) is None and ChatTemplate.of_dir(tmp_path) is None
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("J")  # chat_template.jinja wins
    assert template_in(tmp_path) == ("J", tmp_path / CHAT_TEMPLATE_FILE)


def test_broken_templates_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"t\.jinja: not a valid chat template \(line 1"):
        ChatTemplate("{% for m in messages %}", source="t.jinja", error=ConfigError)
    refusing = ChatTemplate("{{ raise_exception('no system role') }}", source="r.jinja")
    with pytest.raises(ProgramError, match="r.jinja: the chat template failed: no system role"):
        refusing.render([{"role": "user", "content": "x"}])
    # the sandbox: a template cannot reach Python internals
    escaping = ChatTemplate("{{ messages.__class__.__mro__ }}", source="s.jinja")
    with pytest.raises(ProgramError, match="s.jinja: the chat template failed"):
        escaping.render([])
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ProgramError, match="tokenizer_config.json: not valid JSON"):
        template_in(tmp_path)


def test_block_whitespace_as_transformers(tmp_path):
    """trim_blocks/lstrip_blocks: block tags on their own, indented lines leave no blank."""
    from transformers import PreTrainedTokenizerFast

    text = (
        "{% for m in messages %}\n  {% if m.role == 'user' %}\nU: {{ m.content }}\n"
        "  {% else %}\nA: {{ m.content }}\n  {% endif %}\n{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    hf = PreTrainedTokenizerFast(tokenizer_file=str(write_char_tokenizer(tmp_path / "t.json", 96)))
    hf.chat_template = text
    conversation = CONVERSATIONS[2]
    want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert (
        ChatTemplate(text).render(conversation)
        == want
        == ('U: Name a colour.\nA: Blue.\nU: Ünïcödé and "quotes" & <tags>?\nA:')
    )
