"""``edgelora-demo``: the main job on the shipped tiny model, end to end, with figures.

Exports the trained tiny Llama in ``examples/tiny/model`` with its two PEFT adapters
(``reverse``: reverse the order of the words; ``opposite``: swap each adjective for its opposite)
into one foundation.ptd (the default recipe), then on the ExecuTorch runtime: the same prompts
answered by base and by each adapter through ExecuTorch's own ``TextLLMRunner``, each task's
exact-match accuracy on its held-out prompts, file sizes, stage times, speed, adapter switching
in one process, and the output match of every program against its eager model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from edgelora._quiet import quiet_third_party

TINY = Path(__file__).resolve().parent / "examples" / "tiny"
ADAPTERS = ("reverse", "opposite")
PROMPTS = [
    "reverse: happy fish sings =",
    "opposite: the old king likes a warm cake =",
    "once upon a time",
]


@contextlib.contextmanager
def native_log_to(path: Path):
    """Send what native code writes to stderr (ExecuTorch's runner logs) to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="edgelora-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="skip the export: run on DIR, an export of the shipped model with both adapters "
        "and --switchable",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N held-out prompts of each task (default: all 200)",
    )
    ns = p.parse_args(argv)
    quiet_third_party()

    from tokenizers import Tokenizer

    from edgelora._memory import resident_mib
    from edgelora.ci.output_match import match_export
    from edgelora.export.cli import main as export_main
    from edgelora.format.manifest import read_export
    from edgelora.quality.runtime import open_runtime
    from edgelora.quality.scoring import encode_set, score_set
    from edgelora.quality.tasks import cut_answer, read_eval_file
    from edgelora.runtime.sessions import AdapterSession
    from edgelora.runtime.text import generate_text

    if not (TINY / "model" / "model.safetensors").is_file():
        print(f"edgelora-demo: error: the shipped model is missing ({TINY / 'model'})")
        return 1
    work = Path(tempfile.mkdtemp(prefix="edgelora-demo-"))
    native_log = work / "native.log"
    if ns.from_export is not None:
        out = ns.from_export
    else:
        out = ns.output_dir or work / "out"
        argv = ["--checkpoint", str(TINY / "model"), "--output-dir", str(out), "--overwrite"]
        argv += [f"--lora={a}={TINY / 'adapters' / a}" for a in ADAPTERS] + ["--switchable"]
        print("export_llama " + " ".join(argv))
        t0 = time.perf_counter()
        code = export_main(argv)
        if code:
            return code
        print(f"export took {time.perf_counter() - t0:.1f} s")
    manifest = read_export(out)
    q = manifest.quantization

    print("\nfiles:")
    for name, entry in manifest.files.items():
        print(f"  {name:26s} {entry.size / 1024:9.1f} KiB")
    upgraded = sum(1 for f, (m, _) in q.tensors.items() if m != q.qmode and f != "output")
    print(
        f"  (recipe {q.recipe}: {q.qmode} g{q.group_size}"
        f"{', GPTQ' if q.gptq else f', {q.qparams} qparams'}"
        f"{f', {upgraded} most sensitive linears {q.upgrade_qmode}' if q.upgrade else ''}, "
        f"embedding {q.embedding_bits or 'float'}{'-bit' if q.embedding_bits else ''}, "
        f"output layer {q.output_qmode or q.qmode})"
    )

    tokenizer_file = out / manifest.tokenizer
    print(f"\ntext through ExecuTorch's TextLLMRunner (greedy; runner log: {native_log}):")
    programs = ["base", *ADAPTERS]
    for prompt in PROMPTS:
        print(f"  {prompt!r}")
        for name in programs:
            with native_log_to(native_log):
                gen = generate_text(
                    out / f"{name}.pte", tokenizer_file, out / "foundation.ptd", prompt, 20
                )
            print(
                f"    {name:9s} -> {cut_answer(gen.text)!r}  ({gen.decode_tokens_per_s:.0f} "
                f"tokens/s)"
            )

    print("\ntask accuracy on the runtime (held-out prompts, exact match):")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ok = True
    for task in ADAPTERS:
        eval_set = read_eval_file(TINY / "eval" / f"{task}.jsonl", ns.limit)
        encoded = encode_set(eval_set, tokenizer)
        line = []
        for name in ("base", task):
            with native_log_to(native_log):
                scorer = open_runtime(out, adapter=None if name == "base" else name)
                r = score_set(scorer, eval_set, encoded, tokenizer, manifest.eos_ids)
            line.append(f"{name}.pte {100 * r.accuracy:5.1f}%")
        print(f"  {task:9s} ({len(encoded)} prompts): " + ", ".join(line))

    print("\nswitching adapters in one process (switchable.pte, adapter weights as inputs):")
    prompt = tokenizer.encode(PROMPTS[0]).ids
    with native_log_to(native_log):
        session = AdapterSession(out)
        for name in ("reverse", "base", "opposite"):
            switch_s = session.use_adapter(name)
            gen = session.generate(prompt, 8)
            text = cut_answer(tokenizer.decode(gen.tokens))
            print(
                f"  -> {name:9s} switch {switch_s * 1e3:6.2f} ms, decode "
                f"{gen.decode_ms_per_token:.3f} ms/token, RSS {resident_mib():.0f} MiB: {text!r}",
                file=sys.stdout,
                flush=True,
            )

    print("\noutput match (runtime vs eager):")
    with native_log_to(native_log):
        results = match_export(out)
    for r in results:
        print(f"  {r.line()}")
        ok = ok and r.ok
    print(f"\nexport written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
