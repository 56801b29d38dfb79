"""``edgelora-add OUT --lora ...`` and ``edgelora-remove OUT NAME ...``: adapters added to or
removed from an existing export (:mod:`edgelora.export.update` does the work).

``export_llama --add-to OUT [--remove NAME]`` is the same operation under the export's command
(kept as an alias): there the export's own flags may be repeated, and one that disagrees with
``OUT``'s manifest is refused (:func:`update_from_export_flags`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import ConfigError, EdgeLoraError
from edgelora.export.config import AdapterSpec

# export_llama's flags that describe a whole export, not an adapter added to one.
NOT_WITH_ADD = (
    "calibration", "merge", "bundle", "switchable", "tokenizer", "output_dir", "switchable_slots",
    "adapter_dtype", "adapter_template",
)  # fmt: skip

_MODEL_HELP = (
    "the export's model, given again to lower NAME.pte: its checkpoint, or its --params (with "
    "--seed) for random weights. Without either, an export with switchable.pte gets "
    "NAME.lora.safetensors in seconds (and NAME.pte from template.pte when it has one), with no "
    "lowering"
)


def add_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-add",
        description="Add LoRA adapters to an existing export. Its foundation.ptd and every other "
        "file keep their bytes; quantization and model settings come from OUT's manifest; "
        "the new export is swapped in whole, or nothing changes.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the export directory to add to")
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="[NAME=]DIR[:scale=S]",
        help="a PEFT or torchtune LoRA adapter directory (NAME defaults to the directory name; "
        "':scale=S' multiplies its contribution). Repeat for several adapters",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, default=None, help=_MODEL_HELP)
    model.add_argument("--params", type=Path, default=None, help="see --checkpoint")
    p.add_argument(
        "--seed", type=int, default=None, help="with --params: the export's random-weight seed"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an adapter of the same name that OUT already has",
    )
    return p


def remove_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-remove",
        description="Remove adapters (their programs and switchable inputs) from an existing "
        "export; every other file keeps its bytes, and the new export is swapped in whole.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the export directory")
    p.add_argument("names", nargs="+", metavar="NAME", help="adapters to remove")
    return p


def add(
    out: Path,
    lora: list[str],
    *,
    checkpoint: Path | None = None,
    params: Path | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    given: dict[str, object] | None = None,
) -> None:
    """Add the adapters ``lora`` (``[NAME=]DIR[:scale=S]``) to ``out``; ``given``: export
    settings to check against its manifest."""
    from edgelora.export.update import ModelSource, add_adapters

    if not lora:
        raise ConfigError(f"{out}: nothing to add (give --lora [NAME=]DIR)")
    source = None
    if checkpoint is not None or params is not None:
        source = ModelSource(checkpoint, params, seed)
    elif seed is not None:
        raise ConfigError("--seed needs the export's --params")
    add_adapters(
        out, [AdapterSpec.parse(s) for s in lora], source=source, given=given or {},
        overwrite=overwrite,
    )  # fmt: skip


def remove(out: Path, names: list[str]) -> None:
    from edgelora.export.update import remove_adapters

    remove_adapters(out, names)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, object]:
    """The flags of ``argv`` given on the command line rather than defaulted, by destination
    (``parser``'s public API only: every default set to None, then parsed again)."""
    dests = vars(parser.parse_args([]))
    parser.set_defaults(**dict.fromkeys(dests))
    try:
        given = vars(parser.parse_args(argv))
    finally:
        parser.set_defaults(**dests)
    return {k: v for k, v in given.items() if v not in (None, [], False)}


def update_from_export_flags(
    ns: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None
) -> None:
    """``export_llama --add-to OUT``: the alias of :func:`add` / :func:`remove`."""
    given = given_flags(parser, argv)
    for name in NOT_WITH_ADD:
        if name in given:
            raise ConfigError(
                f"--{name.replace('_', '-')} describes a whole export; it cannot be used with "
                "--add-to"
            )
    if ns.remove:
        if ns.lora:
            raise ConfigError("--add-to: --lora and --remove go in separate runs")
        remove(ns.add_to, ns.remove)
        return
    settings = {
        k: v
        for k, v in given.items()
        if k not in ("seed", "lora", "add_to", "checkpoint", "params", "overwrite")
    }
    add(
        ns.add_to, ns.lora, checkpoint=ns.checkpoint, params=ns.params, seed=given.get("seed"),
        overwrite=ns.overwrite, given=settings,
    )  # fmt: skip


def _run(prog: str, work) -> int:
    quiet_third_party()
    try:
        work()
    except EdgeLoraError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_main(argv: list[str] | None = None) -> int:
    ns = add_parser().parse_args(argv)
    return _run(
        "edgelora-add",
        lambda: add(
            ns.out, ns.lora, checkpoint=ns.checkpoint, params=ns.params, seed=ns.seed,
            overwrite=ns.overwrite,
        ),
    )  # fmt: skip


def remove_main(argv: list[str] | None = None) -> int:
    ns = remove_parser().parse_args(argv)
    return _run("edgelora-remove", lambda: remove(ns.out, ns.names))
