"""A conversation with an export, in its own chat template, with the KV cache kept across turns.

Each turn renders the whole conversation with the template the export carries
(:class:`~edgelora.format.chat_template.ChatTemplate`), encodes it with the tokenizer it ships,
and feeds the program only the tokens after those already in its KV cache: the common prefix is
never run again, so a turn costs its own tokens. Where the re-encoded text differs from what
the cache holds (a reply that re-tokenizes differently), the program is fed from the first
differing position, which overwrites the cache from there: the cache always holds exactly the
conversation's tokens.

Replies are greedy and stop at an EOS id the program reports (the export adds the template's
end-of-turn tokens to them). A switch of adapter starts a new conversation: one adapter's KV
cache is never read by another's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import ProgramError
from edgelora.format.chat_template import (
    CHAT_TEMPLATE_FILE,
    ChatTemplate,
    special_tokens,
    tokenizer_config,
)
from edgelora.format.manifest import read_export
from edgelora.runtime.sessions import AdapterSession
from edgelora.runtime.text import shipped_tokenizer


@dataclass
class Reply:
    text: str
    tokens: list[int]  # generated ids, without the EOS that ended the reply
    fed: int  # tokens this turn fed to the program before the reply (the new prompt part)
    stopped: str  # "eos", "max_new_tokens" or "context"


class Chat:
    """``say(text)`` returns the reply; ``reset()``, ``use_adapter(name)``; ``messages`` is the
    conversation so far."""

    def __init__(
        self,
        export_dir: str | Path,
        *,
        adapter: str | None = None,
        system: str | None = None,
        session: str = "auto",
        template: str | Path | None = None,
    ) -> None:

        export_dir = Path(export_dir)
        manifest = read_export(export_dir)
        if template is not None:
            path = Path(template)
        elif manifest.chat_template == CHAT_TEMPLATE_FILE:  # the one name a manifest may give
            path = export_dir / CHAT_TEMPLATE_FILE
        else:
            raise ProgramError(
                f"{export_dir}: the export carries no chat template (re-export from a checkpoint "
                "that has one, or with --chat-template FILE; or pass --chat-template here)"
            )
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ProgramError(f"{path}: cannot read the chat template ({e})") from None
        tokens = special_tokens(tokenizer_config(export_dir))
        self.template = ChatTemplate(text, tokens, source=source)
        self.tokenizer = load_tokenizer(shipped_tokenizer(export_dir))
        self.session = AdapterSession(export_dir, session)
        self.system = system
        self.messages: list[dict[str, str]] = []
        self._cached: list[int] = []  # the tokens in the KV cache, positions 0...
        self._eos = set(manifest.eos_ids)
        if adapter is not None:
            self.use_adapter(adapter)

    @property
    def adapter(self) -> str | None:
        return self.session.adapter

    @property
    def adapters(self) -> list[str]:
        return list(self.session.adapters)

    @property
    def max_seq_len(self) -> int:
        return self.session.program.max_seq_len

    @property
    def context_used(self) -> int:
        return len(self._cached)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages, self._cached = [], []

    def use_adapter(self, name: str | None) -> float:
        """Switch adapter (``None``/``"base"``: none) and start a new conversation; returns the
        switch's seconds."""
        seconds = self.session.use_adapter(name)
        self.reset()
        return seconds

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as the program reads it, with the assistant's turn opened."""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = self.template.render(full, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def say(
        self,
        text: str,
        *,
        max_new_tokens: int = 256,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        """Add the user's ``text``, generate the reply greedily (streaming its text to
        ``on_text`` as it becomes printable), add it to the conversation and return it."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.prompt_ids(messages)
        limit = self.max_seq_len
        if len(ids) >= limit:
            raise ProgramError(
                f"the conversation is {len(ids)} tokens, the program's context {limit}: "
                "start a new one (/reset)"
            )
        keep = 0
        for a, b in zip(self._cached, ids, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # feed at least one token: its logits start the reply
        program = self.session.program
        logits = program.forward(ids[keep:], keep)
        fed, self._cached = len(ids) - keep, list(ids)
        reply: list[int] = []
        shown = ""
        stopped = "max_new_tokens"
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            if token in self._eos:
                stopped = "eos"
                break
            reply.append(token)
            if on_text is not None:
                now = self.tokenizer.decode(reply, skip_special_tokens=True)
                if not now.endswith("\ufffd"):  # wait for a character's remaining bytes
                    on_text(now[len(shown) :])
                    shown = now
            if len(self._cached) >= limit:  # no position left to feed the token at
                stopped = "context"
                break
            logits = program.forward([token], len(self._cached))
            self._cached.append(token)
        answer = self.tokenizer.decode(reply, skip_special_tokens=True)
        if on_text is not None and len(answer) > len(shown):
            on_text(answer[len(shown) :])
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return Reply(answer, reply, fed, stopped)


def load_tokenizer(path: Path):
    """``tokenizers.Tokenizer`` of a ``tokenizer.json``; :class:`ProgramError` naming the file
    if it cannot be read."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers' own errors, and a Rust panic (a BaseException)
        raise ProgramError(f"{path}: cannot read the tokenizer ({e})") from None
