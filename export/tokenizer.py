"""The tokenizer an export ships: checked at export time with the parser ExecuTorch's runner
uses (``pytorch_tokenizers``), so a file the device cannot read fails here, naming the reason;
and the chat template it carries, found, parsed and rendered once before any long step."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from edgelora.errors import ConfigError
from edgelora.format.chat_template import (
    ChatTemplate,
    end_of_turn_ids,
    special_tokens,
    tokenizer_config,
)


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """Load ``path`` as ExecuTorch's runner does (a Hugging Face ``tokenizer.json``);
    :class:`ConfigError` naming the file and the parser's reason if it cannot, or if its ids
    do not fit the model's vocabulary."""
    # The parser logs its reason to the process's stderr (C++), then raises a bare error:
    # capture the file descriptors to give the reason in the message (and to keep its
    # informational lines, "I tokenizers:regex.cpp:40] ...", out of the export's output).
    with tempfile.TemporaryFile(mode="w+b") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in saved:
            os.dup2(err.fileno(), fd)
        try:
            from pytorch_tokenizers import CppHFTokenizer

            tok = CppHFTokenizer()
            tok.load(str(path))
            failure = None
        except RuntimeError as e:
            failure = str(e)
        finally:
            for fd, dup in saved.items():
                os.dup2(dup, fd)
                os.close(dup)
        err.seek(0)
        log = err.read().decode(errors="replace")
    if failure is not None:
        reasons = [line.split("] ", 1)[-1] for line in log.splitlines() if line.startswith("E ")]
        raise ConfigError(
            f"{path}: ExecuTorch's tokenizer parser cannot read this file "
            f"({'; '.join(reasons) or failure}); the runner on the device would fail the same way"
        )
    if tok.vocab_size() > vocab_size:
        raise ConfigError(
            f"{path}: the tokenizer has {tok.vocab_size()} ids, the model's vocabulary {vocab_size}"
        )


def find_chat_template(
    given: Path | None, checkpoint, tokenizer_files: tuple[Path, ...]
) -> tuple[str | None, str | None]:
    """``(text, source)`` of the chat template the export carries: ``given`` (``--chat-template``),
    else the checkpoint directory's, else the one beside the shipped tokenizer; ``(None,
    None)`` if there is none. :class:`ConfigError` naming the file if it cannot be read or
    parsed."""
    if given is not None:
        if not given.is_file():
            raise ConfigError(f"{given}: chat template file not found")
        text = _read(given)
        ChatTemplate(text, source=str(given), error=ConfigError)  # parses, or names the line
        return text, str(given)
    dirs = [p.parent for p in tokenizer_files]
    if checkpoint is not None and checkpoint.path.is_dir():
        dirs.insert(0, checkpoint.path)
    for directory in dict.fromkeys(dirs):
        template = ChatTemplate.of_dir(directory, error=ConfigError)
        if template is not None:
            return template.text, template.source
    return None, None


def end_of_turn_eos(
    eos_ids: list[int], template: str, tokenizer_files: tuple[Path, ...]
) -> list[int]:
    """``eos_ids`` and the end-of-turn tokens the template writes (``<|im_end|>``,
    ``<end_of_turn>``...), looked up in the shipped ``tokenizer.json``."""
    tokenizer_json = next((p for p in tokenizer_files if p.name == "tokenizer.json"), None)
    if tokenizer_json is None:
        return list(eos_ids)
    compiled = _compiled(template, "chat template", tokenizer_files)
    try:
        extra = end_of_turn_ids(compiled, tokenizer_json, ConfigError)
    except ConfigError:  # it refuses a user/assistant/user conversation: nothing to learn here
        extra = []  # (check_chat_template names a template that cannot render at all)
    return list(dict.fromkeys([*eos_ids, *extra]))


def check_chat_template(text: str, source: str, tokenizer_files: tuple[Path, ...]) -> None:
    """Render a one-message conversation with the special tokens of the shipped tokenizer
    config: a template that cannot fails the export here, naming the file and the reason."""
    template = _compiled(text, source, tokenizer_files)
    template.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)


def _compiled(text: str, source: str, tokenizer_files: tuple[Path, ...]) -> ChatTemplate:
    config = next((p for p in tokenizer_files if p.name == "tokenizer_config.json"), None)
    tokens = {} if config is None else special_tokens(tokenizer_config(config.parent, ConfigError))
    return ChatTemplate(text, tokens, source=source, error=ConfigError)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
