"""``edgelora-eval``: task accuracy and perplexity of an exported program, measured on the
ExecuTorch runtime, optionally side by side with the eager transformers (+ peft) model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import ConfigError, EdgeLoraError
from edgelora.runtime.chat_cli import add_runtime_flags
from edgelora.runtime.native import TERMINAL

EPILOG = """\
evaluation files:
  NAME.jsonl   one {"prompt": ..., "answer": ...} object per line. An answer is correct when
               the greedy continuation of the prompt (encoded by the tokenizer as it is, no BOS
               added), cut at the first newline or EOS and stripped, equals the answer
               stripped. Perplexity is over the answer's tokens, encode(prompt + SEP + answer)
               after the prompt's, SEP being --separator.
  other files  text, one sequence per non-empty line; perplexity over every token but the first.

agreement (with --reference): the share of scored positions where the runtime's and the
reference's argmax tokens are equal (teacher forced), and for task files the share of equal
greedy answers.

examples:
  edgelora-eval out/ --adapter add examples/tiny/eval/add.jsonl
  edgelora-eval out/ --adapter add --switchable examples/tiny/eval/add.jsonl --json
  edgelora-eval out/ --adapter add examples/tiny/eval/add.jsonl \\
      --reference examples/tiny/model --lora examples/tiny/adapters/add
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-eval",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target",
        type=Path,
        help="an export directory (--adapter picks the program by its manifest; default base) "
        "or a .pte file (with --data and --tokenizer)",
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="evaluation files")
    p.add_argument("--adapter", metavar="NAME", default=None, help="the adapter to evaluate")
    p.add_argument(
        "--switchable",
        action="store_true",
        help="select --adapter in the export's switchable.pte instead of running NAME.pte",
    )
    p.add_argument("--data", type=Path, default=None, help="a .pte file's foundation.ptd")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="evaluate a .pte file that carries no edgelora checksums (ExecuTorch's own "
        "example's); refused by default",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json (default: the one the export ships)",
    )
    p.add_argument(
        "--eos-ids",
        default=None,
        metavar="I,J",
        help="ids that end a generation (default: the export's manifest)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="HF_DIR",
        help="also score the eager transformers model in HF_DIR (float32) on the same inputs",
    )
    p.add_argument(
        "--lora",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --reference: a PEFT adapter applied to it (with peft)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="longest greedy answer, in tokens (default 32)",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N lines")
    p.add_argument(
        "--separator",
        default=None,
        help="between prompt and answer (default ' '; with --chat '')",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="each task prompt is a user message: render it with the export's chat template "
        "(or --chat-template), the assistant's turn opened, before encoding; the answer is "
        "the assistant's reply",
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --chat: this Jinja template instead of the export's",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_flags(p)
    return p


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def markdown(rows: list[dict]) -> str:
    ref = any("reference" in r for r in rows)
    head = "| file | program | lines | accuracy | perplexity |"
    rule = "|---|---|---:|---:|---:|"
    if ref:
        head += " reference accuracy | reference perplexity | token agreement | answer agreement |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        rt = r["runtime"]
        line = (
            f"| {rt['eval_set']} | {rt['label']} | {rt['examples']} | "
            f"{_fmt(rt['accuracy'], True)} | {_fmt(rt['perplexity'])} |"
        )
        if ref:
            rf, ag = r["reference"], r["agreement"]
            line += (
                f" {_fmt(rf['accuracy'], True)} | {_fmt(rf['perplexity'])} | "
                f"{_fmt(ag['token_agreement'], True)} | "
                f"{_fmt(ag.get('answer_agreement'), True)} |"
            )
        lines.append(line)
    return "\n".join(lines)


def evaluate(ns: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    from edgelora.quality.runtime import export_eos_ids, open_runtime
    from edgelora.quality.scoring import agreement, encode_set, score_set
    from edgelora.quality.tasks import as_chat, read_eval_file
    from edgelora.runtime.chat import load_tokenizer
    from edgelora.runtime.text import shipped_tokenizer

    if ns.lora is not None and ns.reference is None:
        raise ConfigError("--lora needs --reference HF_DIR")
    sets = [read_eval_file(f, ns.limit) for f in ns.files]
    tok_path = ns.tokenizer or (shipped_tokenizer(ns.target) if ns.target.is_dir() else None)
    if tok_path is None:
        raise ConfigError(f"{ns.target}: a .pte file needs --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if ns.eos_ids is not None:
        eos = [int(t) for t in ns.eos_ids.split(",") if t.strip()]
    else:
        eos = export_eos_ids(ns.target)
        if eos is None:
            raise ConfigError(f"{ns.target}: a .pte file needs --eos-ids")
    scorers = [
        open_runtime(
            ns.target,
            adapter=ns.adapter,
            data=ns.data,
            switchable=ns.switchable,
            allow_unverified=ns.allow_unverified,
        )
    ]
    if ns.reference is not None:
        from edgelora.quality.reference import ReferenceScorer

        scorers.append(ReferenceScorer(ns.reference, ns.lora))
    separator = ns.separator if ns.separator is not None else ("" if ns.chat else " ")
    if ns.chat:
        template = _chat_template(ns)
        sets = [as_chat(s, template) for s in sets]
    rows = []
    for s in sets:
        encoded = encode_set(s, tokenizer, separator)
        results = []
        for scorer in scorers:

            def bar(it, label=scorer.label, name=s.name):
                return tqdm(
                    it, desc=f"{name} [{label}]", disable=ns.no_progress, leave=False,
                    file=TERMINAL.err,
                )  # fmt: skip

            results.append(
                score_set(
                    scorer, s, encoded, tokenizer, eos,
                    max_new_tokens=ns.max_new_tokens, progress=bar,
                )
            )  # fmt: skip
        row = {"runtime": results[0].to_json()}
        if len(results) == 2:
            row["reference"] = results[1].to_json()
            row["agreement"] = agreement(results[0], results[1])
        rows.append(row)
    return rows


def _chat_template(ns: argparse.Namespace):
    from edgelora.format.chat_template import ChatTemplate, special_tokens, tokenizer_config

    if ns.chat_template is not None:
        if not ns.chat_template.is_file():
            raise ConfigError(f"{ns.chat_template}: chat template file not found")
        directory = ns.target if ns.target.is_dir() else ns.chat_template.parent
        tokens = special_tokens(tokenizer_config(directory, ConfigError))
        text = ns.chat_template.read_text(encoding="utf-8")
        return ChatTemplate(text, tokens, source=str(ns.chat_template), error=ConfigError)
    template = ChatTemplate.of_dir(ns.target, error=ConfigError) if ns.target.is_dir() else None
    if template is None:
        raise ConfigError(
            f"{ns.target}: --chat needs a chat template (the export has none: pass --chat-template FILE)"
        )
    return template


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_third_party()
    from edgelora.runtime.native import native_output, set_threads

    try:
        with native_output(ns.log, verbose=ns.verbose):
            set_threads(ns.threads)
            rows = evaluate(ns)
    except EdgeLoraError as e:
        print(f"edgelora-eval: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if ns.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
