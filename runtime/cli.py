"""``edgelora-run``: run an exported program on the ExecuTorch runtime and time it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import EdgeLoraError
from edgelora.runtime.chat_cli import add_runtime_flags
from edgelora.runtime.native import TERMINAL


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("the prompt needs at least one token id")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-run",
        description=(
            "Load a .pte program (with its foundation .ptd) on the ExecuTorch runtime, prefill "
            "the prompt in one call, decode greedily with the KV cache, and print the tokens, "
            "prefill tokens/s and decode ms/token. With --prompt TEXT --tokenizer FILE it runs "
            "ExecuTorch's own LLM runner (TextLLMRunner) and prints the generated text, time to "
            "first token and tokens/s."
        ),
    )
    p.add_argument(
        "pte",
        type=Path,
        help="the program (out/base.pte, out/<adapter>.pte) or an export directory "
        "(then --adapter picks the program by its manifest, and --data defaults to its "
        "foundation)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the foundation data file the program was exported with (foundation.ptd)",
    )
    p.add_argument(
        "--adapter",
        metavar="NAME",
        default=None,
        help="with an export directory: the adapter program to run (default base)",
    )
    p.add_argument(
        "--adapters",
        metavar="A,B,...",
        default=None,
        help="with an export directory: hold the foundation once and run the prompt with each "
        "named adapter in turn ('base' for none), switching in one process; prints each "
        "switch's latency and the process's resident memory. Uses switchable.pte "
        "(--switchable export), else bundle.pte (--bundle), else NAME.pte, or what --session "
        "names; needs "
        "--prompt-ids",
    )
    p.add_argument(
        "--session",
        choices=["auto", "switchable", "bundle", "template", "programs"],
        default="auto",
        help="with --adapters: how to switch. switchable: one program, adapter weights passed "
        "as inputs (fastest switch, slower decode); bundle: one method per adapter; template: "
        "each adapter's program made from template.pte and its NAME.lora.safetensors at the "
        "switch and loaded in place of the previous one (decode at adapter-program speed, "
        "the foundation packed again per switch); programs: NAME.pte loaded in place of the "
        "previous program (any export); auto: switchable, else bundle, else programs",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt-ids",
        type=_token_ids,
        metavar="1,2,3",
        help="prompt token ids, comma separated",
    )
    prompt.add_argument(
        "--prompt",
        metavar="TEXT",
        help="prompt text, completed as it is (needs --tokenizer); prints the continuation",
    )
    prompt.add_argument(
        "--chat",
        metavar="TEXT",
        help="with an export directory: one user message, rendered with the export's chat "
        "template (see --system); prints only the answer. edgelora-chat holds a conversation",
    )
    p.add_argument("--system", metavar="TEXT", default=None, help="with --chat: a system message")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="FILE",
        help="tokenizer for --prompt: a Hugging Face tokenizer.json, SentencePiece .model or "
        "tiktoken file (whatever ExecuTorch's runner reads); default with an export "
        "directory: the tokenizer it ships",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate greedily (capped by the program's max_seq_len; default 16, "
        "with --chat 256)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="with --prompt-ids: decode all --max-new-tokens steps, past an EOS id (benchmarks "
        "time a fixed number of steps); by default an EOS id the program reports ends it",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="run a program file that carries no edgelora checksums (ExecuTorch's own "
        "example's); by default such a program is refused, since neither its bytes nor its "
        "foundation can be verified",
    )
    p.add_argument(
        "--logits-out",
        type=Path,
        default=None,
        metavar="FILE.npy",
        help="save the prompt's logits as a [seq, vocab] float32 .npy array",
    )
    add_runtime_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_third_party()
    from edgelora.runtime.native import native_output

    try:
        with native_output(ns.log, verbose=ns.verbose):
            return _main(ns)
    except EdgeLoraError as e:
        print(f"edgelora-run: error: {e}", file=TERMINAL.err)
        return 2


def _main(ns: argparse.Namespace) -> int:
    """The command; its errors reach :func:`main`, which prints them once the native output
    is restored."""
    ns.max_new_tokens_given = ns.max_new_tokens is not None
    if ns.max_new_tokens is None:
        ns.max_new_tokens = 16
    if ns.chat is not None and not ns.pte.is_dir():
        raise EdgeLoraError("--chat needs an export directory")
    if ns.max_new_tokens < 0:
        raise EdgeLoraError("--max-new-tokens must be >= 0")
    if ns.prompt is not None and ns.tokenizer is None and not ns.pte.is_dir():
        raise EdgeLoraError(
            "--prompt needs --tokenizer FILE (or an export directory that ships one)"
        )
    from edgelora.runtime.native import set_threads
    from edgelora.runtime.program import LlamaProgram
    from edgelora.runtime.text import generate_text, resolve_program, shipped_tokenizer

    ns.threads = set_threads(ns.threads)
    if ns.chat is not None:
        return _chat(ns)
    if ns.adapters is not None:
        return _switch_demo(ns)
    if ns.pte.is_dir():
        if ns.prompt is not None and ns.tokenizer is None:
            ns.tokenizer = shipped_tokenizer(ns.pte)
        ns.pte, foundation = resolve_program(ns.pte, ns.adapter)
        ns.data = ns.data or foundation
    elif ns.adapter is not None:
        raise EdgeLoraError("--adapter picks a program from an export directory; got a file")
    if ns.prompt is not None:
        return _print_text(
            ns,
            generate_text(
                ns.pte,
                ns.tokenizer,
                ns.data,
                ns.prompt,
                ns.max_new_tokens,
                allow_unverified=ns.allow_unverified,
            ),
        )
    program = LlamaProgram(ns.pte, ns.data, allow_unverified=ns.allow_unverified)
    gen = program.generate(ns.prompt_ids, ns.max_new_tokens, stop_at_eos=not ns.ignore_eos)
    if ns.logits_out is not None:
        import numpy as np

        np.save(ns.logits_out, gen.prompt_logits.float().numpy())
    result = {
        "program": str(ns.pte),
        "data": None if ns.data is None else str(ns.data),
        "prompt": gen.prompt,
        "tokens": gen.tokens,
        "prefill_tokens_per_s": round(gen.prefill_tokens_per_s, 2),
        "prefill_ms": round(gen.prefill_s * 1e3, 3),
        "decode_ms_per_token": round(gen.decode_ms_per_token, 4) if gen.decode_s else None,
        "threads": ns.threads,
    }
    if ns.json:
        print(json.dumps(result), file=TERMINAL.out)
    else:
        print(f"tokens: {' '.join(map(str, gen.tokens))}", file=TERMINAL.out)
        print(
            f"prefill: {len(gen.prompt)} tokens in {result['prefill_ms']:.2f} ms "
            f"({result['prefill_tokens_per_s']:.1f} tokens/s, {ns.threads} threads)",
            file=TERMINAL.out,
        )
        if gen.decode_s:
            print(
                f"decode: {result['decode_ms_per_token']:.3f} ms/token (median of "
                f"{len(gen.decode_s)} steps)",
                file=TERMINAL.out,
            )
    return 0


def _switch_demo(ns: argparse.Namespace) -> int:
    """``--adapters``: one session, the prompt under each adapter in turn."""
    from edgelora._memory import resident_mib
    from edgelora.runtime.sessions import AdapterSession

    names = [n.strip() for n in ns.adapters.split(",") if n.strip()]
    if not ns.pte.is_dir() or ns.prompt_ids is None or ns.adapter or ns.data or not names:
        raise EdgeLoraError(
            "--adapters A,B,... needs an export directory and --prompt-ids (not --adapter, "
            "--data or --prompt)"
        )
    session = AdapterSession(ns.pte, ns.session)
    results = []
    for name in names:
        switch_s = session.use_adapter(name)
        gen = session.generate(ns.prompt_ids, ns.max_new_tokens, stop_at_eos=not ns.ignore_eos)
        results.append(
            {
                "adapter": name,
                "switch_ms": round(switch_s * 1e3, 3),
                "tokens": gen.tokens,
                "decode_ms_per_token": round(gen.decode_ms_per_token, 4) if gen.decode_s else None,
                "rss_mib": round(resident_mib(), 1),
            }
        )
    if ns.json:
        print(
            json.dumps({"export": str(ns.pte), "mode": session.mode, "runs": results}),
            file=TERMINAL.out,
        )
        return 0
    how = "a program per switch" if session.mode == "template" else "foundation loaded once"
    print(f"{ns.pte} ({session.mode}.pte, {how})", file=TERMINAL.out)
    for r in results:
        decode = (
            "" if r["decode_ms_per_token"] is None else f", {r['decode_ms_per_token']:.3f} ms/token"
        )
        print(
            f"  {r['adapter']:>12}: switch {r['switch_ms']:.2f} ms, RSS {r['rss_mib']:.0f} MiB"
            f"{decode}; tokens {' '.join(map(str, r['tokens']))}",
            file=TERMINAL.out,
        )
    return 0


def _print_text(ns: argparse.Namespace, gen) -> int:
    result = {
        "program": str(ns.pte),
        "data": None if ns.data is None else str(ns.data),
        "prompt": gen.prompt,
        "text": gen.text,
        "prompt_tokens": gen.prompt_tokens,
        "generated_tokens": gen.generated_tokens,
        "time_to_first_token_ms": round(gen.time_to_first_token_s * 1e3, 3),
        "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2),
    }
    if ns.json:
        print(json.dumps(result), file=TERMINAL.out)
    else:
        print(gen.text, file=TERMINAL.out)
        print(
            f"{gen.prompt_tokens} prompt tokens, {gen.generated_tokens} generated; time to first "
            f"token {result['time_to_first_token_ms']:.1f} ms, decode "
            f"{result['decode_tokens_per_s']:.1f} tokens/s",
            file=TERMINAL.err,
        )
    return 0


def _chat(ns: argparse.Namespace) -> int:
    """``--chat TEXT``: one turn in the export's template; only the answer is printed."""
    from edgelora.runtime.chat import Chat

    if ns.adapters is not None or ns.data is not None:
        raise EdgeLoraError("--chat takes --adapter NAME, not --adapters or --data")
    chat = Chat(ns.pte, adapter=ns.adapter, system=ns.system)
    max_new = ns.max_new_tokens if ns.max_new_tokens_given else 256
    reply = chat.say(ns.chat, max_new_tokens=max_new)
    if ns.json:
        print(
            json.dumps({"answer": reply.text, "tokens": reply.tokens, "stopped": reply.stopped}),
            file=TERMINAL.out,
        )
    else:
        print(reply.text, file=TERMINAL.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
