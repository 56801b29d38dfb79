"""``edgelora-chat``: hold a conversation with an export in the terminal, in its chat template.

Replies stream as they are generated; the KV cache is kept across turns (a turn runs only its
own tokens). Commands inside a session: ``/reset`` starts over, ``/adapter NAME`` switches
adapter (``/adapter base``: none) and starts over, ``/adapters`` lists them, ``/quit`` ends
(so does Ctrl-D). Nothing but the conversation is printed: ExecuTorch's native log lines go
to ``--log FILE`` (or nowhere; ``--verbose`` shows them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import EdgeLoraError
from edgelora.runtime.native import TERMINAL

HELP = "/reset: new conversation; /adapter NAME: switch (base: none); /adapters; /quit"


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--log``, ``--verbose``: every runtime command has them."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the runtime's threadpool (default: one per core, as ExecuTorch "
        "counts them; see the README's speed section for when 1 is faster)",
    )
    p.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append ExecuTorch's native log lines to FILE (default: drop them)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="let native log lines through to the terminal"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-chat",
        description=__doc__.split("\n\n")[0],
        epilog="Inside a session: " + HELP,
    )
    p.add_argument("export", type=Path, help="an export directory (export_llama --output-dir)")
    p.add_argument(
        "--adapter",
        metavar="NAME",
        default=None,
        help="start with this adapter (default: the base model)",
    )
    p.add_argument(
        "--system", metavar="TEXT", default=None, help="a system message opening the conversation"
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="render with this Jinja template instead of the one the export carries",
    )
    p.add_argument(
        "--session",
        choices=["auto", "switchable", "bundle", "template", "programs"],
        default="auto",
        help="how /adapter switches (see edgelora-run --help); auto: switchable.pte if the "
        "export has it, else bundle.pte, else a program per adapter",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="longest reply, in tokens (default 256; the program's context bounds it too)",
    )
    add_runtime_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_third_party()
    if ns.max_new_tokens < 1:
        print("edgelora-chat: error: --max-new-tokens must be >= 1", file=TERMINAL.err)
        return 2
    from edgelora.runtime.native import native_output, set_threads

    try:
        with native_output(ns.log, verbose=ns.verbose):
            set_threads(ns.threads)
            from edgelora.runtime.chat import Chat

            chat = Chat(
                ns.export,
                adapter=ns.adapter,
                system=ns.system,
                session=ns.session,
                template=ns.chat_template,
            )
            return _loop(chat, ns.max_new_tokens)
    except EdgeLoraError as e:
        print(f"edgelora-chat: error: {e}", file=TERMINAL.err)
        return 2


def _loop(chat, max_new_tokens: int) -> int:
    who = chat.adapter or "base"
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edgelora-chat: {who} ({HELP})", file=TERMINAL.err)
    while True:
        if interactive:
            print(f"{chat.adapter or 'base'}> ", end="", flush=True, file=TERMINAL.err)
        line = sys.stdin.readline()
        if not line:
            if interactive:
                print(file=TERMINAL.err)
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, arg = text[1:].strip().partition(" ")
            if command in ("quit", "exit"):
                return 0
            try:
                _command(chat, command, arg.strip())
            except EdgeLoraError as e:
                print(f"error: {e}", file=TERMINAL.err)
            continue
        try:
            reply = chat.say(
                text,
                max_new_tokens=max_new_tokens,
                on_text=lambda piece: print(piece, end="", flush=True, file=TERMINAL.out),
            )
        except EdgeLoraError as e:
            print(f"error: {e}", file=TERMINAL.err)
            continue
        print(file=TERMINAL.out)
        if reply.stopped == "context":
            print("[the context is full: /reset to start over]", file=TERMINAL.err)


def _command(chat, command: str, arg: str) -> None:
    if command == "reset":
        chat.reset()
        print("[new conversation]", file=TERMINAL.err)
    elif command == "adapter":
        seconds = chat.use_adapter(arg or None)
        print(
            f"[adapter {chat.adapter or 'base'} ({seconds * 1e3:.0f} ms); new conversation]",
            file=TERMINAL.err,
        )
    elif command == "adapters":
        print(f"[adapters: {', '.join(['base', *chat.adapters])}]", file=TERMINAL.err)
    else:
        print(f"[unknown command /{command}; {HELP}]", file=TERMINAL.err)


if __name__ == "__main__":
    sys.exit(main())
