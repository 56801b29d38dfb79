"""The chat template an export carries, and rendering it as Hugging Face transformers does.

A checkpoint keeps its template in ``chat_template.jinja`` (transformers 5) or in
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of which
``default`` is used). The export ships it as ``chat_template.jinja`` and the manifest names it.

:class:`ChatTemplate` renders it in the environment ``apply_chat_template`` uses: a sandboxed
jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, ``loopcontrols``, a ``tojson``
that does not escape HTML, ``raise_exception``, ``strftime_now``, a pass-through
``{% generation %}`` block, and the tokenizer's special tokens (``bos_token``, ``eos_token``,
...) as variables. Tests compare it with transformers on every family fixture.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeLoraError, ProgramError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def template_in(
    directory: Path, error: type[EdgeLoraError] = ProgramError
) -> tuple[str, Path] | None:
    """``(text, file it came from)`` of the chat template a checkpoint or tokenizer directory
    holds, ``None`` if it has none: ``chat_template.jinja`` first, then
    ``tokenizer_config.json``'s ``chat_template``."""
    path = directory / CHAT_TEMPLATE_FILE
    if path.is_file():
        return _read_text(path, error), path
    config = tokenizer_config(directory, error)
    text = config.get("chat_template")
    if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if text is None:
        return None
    if not isinstance(text, str):
        raise error(f"{directory / TOKENIZER_CONFIG}: chat_template is not a string")
    return text, directory / TOKENIZER_CONFIG


def tokenizer_config(directory: Path, error: type[EdgeLoraError] = ProgramError) -> dict:
    """``tokenizer_config.json`` of ``directory`` (``{}`` if absent)."""
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(_read_text(path, error))
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise error(f"{path}: expected a JSON object")
    return config


def special_tokens(config: dict) -> dict[str, str]:
    """The special tokens a template may name (``bos_token`` ...), from a tokenizer config:
    each a string or ``{"content": ...}``."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def end_of_turn_ids(
    template: ChatTemplate, tokenizer_json: Path, error: type[EdgeLoraError]
) -> list[int]:
    """The id of the special token that ends an assistant's turn in this template
    (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, Mistral's ``</s>``...), found by
    rendering a conversation and reading what follows the assistant's words; ``[]`` if no
    special token of the tokenizer follows them."""
    try:
        added = json.loads(_read_text(tokenizer_json, error)).get("added_tokens") or []
    except (ValueError, RecursionError, AttributeError) as e:
        raise error(f"{tokenizer_json}: not a tokenizer.json ({e})") from None
    special = {
        t["content"]: t["id"]
        for t in added
        if isinstance(t, dict)
        and t.get("special")
        and isinstance(t.get("content"), str)
        and t["content"]
        and isinstance(t.get("id"), int)
    }
    said = "edgeloraassistantwords"
    conversation = [
        {"role": "user", "content": "edgelorauserwords"},
        {"role": "assistant", "content": said},
        {"role": "user", "content": "edgelorauserwords"},
    ]
    text = template.render(conversation, add_generation_prompt=True)
    at = text.find(said)
    if at < 0:
        return []
    rest = text[at + len(said) :].lstrip()
    ends = [c for c in special if rest.startswith(c)]
    return [special[max(ends, key=len)]] if ends else []


class ChatTemplate:
    """A compiled chat template; ``error`` is the exception class a broken one raises."""

    def __init__(
        self,
        text: str,
        tokens: dict[str, str] | None = None,
        *,
        source: str = CHAT_TEMPLATE_FILE,
        error: type[EdgeLoraError] = ProgramError,
    ) -> None:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):  # {% generation %}...{% endgeneration %}: the body as is
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                    lineno
                )

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source, self.text, self._error = source, text, error
        self.tokens = dict(tokens or {})
        self._jinja_errors = (jinja2.exceptions.TemplateError,)
        try:
            self._template = env.from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise error(
                f"{source}: not a valid chat template (line {e.lineno}: {e.message})"
            ) from None

    @classmethod
    def of_dir(
        cls, directory: Path, *, error: type[EdgeLoraError] = ProgramError
    ) -> ChatTemplate | None:
        found = template_in(directory, error)
        if found is None:
            return None
        text, path = found
        tokens = special_tokens(tokenizer_config(directory, error))
        return cls(text, tokens, source=str(path), error=error)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it (``apply_chat_template(...,
        tokenize=False)``)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.tokens,
            )
        except self._jinja_errors as e:
            raise self._error(f"{self.source}: the chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
            raise self._error(
                f"{self.source}: the chat template failed: {type(e).__name__}: {e}"
            ) from None


def _read_text(path: Path, error: type[EdgeLoraError]) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
