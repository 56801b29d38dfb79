"""``edgelora-inspect FILE...``: what ``.pte`` programs and ``.ptd`` data files hold, and
whether they fit together.

For each data file: its keys with size, dtype and shape where the file records them. For each
program: its methods, the named data it holds itself, the keys it needs from a data file, the
foundation sha256 it records (and whether a given data file has it). Across the files: keys a
program needs that no given data file has, and keys held by more than one data file (ExecuTorch
refuses to load two data files that share a key). Exit status 1 if either is found, or a
program's bytes do not match the checksum it records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgelora._quiet import quiet_third_party
from edgelora.errors import EdgeLoraError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelora-inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, help=".pte programs and .ptd data files")
    p.add_argument("--keys", action="store_true", help="list every key of each file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def inspect_files(paths: list[Path]) -> dict:
    """The report ``edgelora-inspect`` prints, as a dict."""
    from edgelora.format.checksums import recorded_checksums
    from edgelora.format.layout import sha256_file
    from edgelora.format.pte import ptd_entries, read_pte

    data, programs = {}, {}
    for path in paths:
        if path.suffix == ".ptd":
            entries = ptd_entries(path)
            data[str(path)] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "keys": {
                    k: {"size": e.size, "dtype": e.dtype, "shape": e.shape}
                    for k, e in sorted(entries.items())
                },
            }
        elif path.suffix == ".pte":
            info = read_pte(path)
            programs[str(path)] = {
                "bytes": info.size,
                "methods": info.methods,
                "inline_keys": dict(sorted(info.inline.items())),
                "needed_keys": sorted(info.needed),
                **recorded_checksums(path),
            }
        else:
            raise EdgeLoraError(f"{path}: expected a .pte program or a .ptd data file")
    holders: dict[str, list[str]] = {}
    for name, d in data.items():
        for key in d["keys"]:
            holders.setdefault(key, []).append(name)
    for p in programs.values():
        p["missing_keys"] = sorted(set(p["needed_keys"]) - set(holders)) if data else None
        want = p["foundation_sha256"]
        p["foundation_found"] = (
            None if want is None or not data else any(d["sha256"] == want for d in data.values())
        )
    duplicates = {k: v for k, v in sorted(holders.items()) if len(v) > 1}
    return {"data_files": data, "programs": programs, "duplicate_keys": duplicates}


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def _print(report: dict, keys: bool) -> None:
    for name, d in report["data_files"].items():
        print(
            f"{name}: data file, {len(d['keys'])} keys, {_mb(d['bytes'])}, "
            f"sha256 {d['sha256'][:16]}..."
        )
        if keys:
            for k, e in d["keys"].items():
                what = "" if e["dtype"] is None else f" {e['dtype']} {list(e['shape'])}"
                print(f"    {k}  {e['size']} B{what}")
    for name, p in report["programs"].items():
        inline = sum(p["inline_keys"].values())
        print(f"{name}: program, {_mb(p['bytes'])}, methods {', '.join(p['methods'])}")
        print(
            f"    holds {len(p['inline_keys'])} keys itself ({_mb(inline)}); needs "
            f"{len(p['needed_keys'])} keys from a data file"
        )
        if keys:
            for k in p["needed_keys"]:
                print(f"    needs {k}")
        if p["checksum_ok"] is False:
            print("    CORRUPT: the program's checksum does not match its bytes")
        if p["foundation_sha256"]:
            found = {
                None: "",
                True: " (a given data file has it)",
                False: " (NO given data file has it)",
            }[p["foundation_found"]]
            print(f"    records foundation sha256 {p['foundation_sha256'][:16]}...{found}")
        if p["missing_keys"]:
            print(
                f"    MISSING {len(p['missing_keys'])} keys from the given data files, e.g. "
                + ", ".join(p["missing_keys"][:3])
            )
    if report["duplicate_keys"]:
        print(
            f"{len(report['duplicate_keys'])} keys are in more than one data file, e.g. "
            + "; ".join(
                f"{k} in {', '.join(v)}" for k, v in list(report["duplicate_keys"].items())[:3]
            )
        )


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_third_party()
    try:
        report = inspect_files(ns.files)
    except EdgeLoraError as e:
        print(f"edgelora-inspect: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(report))
    else:
        _print(report, ns.keys)
    bad = report["duplicate_keys"] or any(
        p["missing_keys"] or p["foundation_found"] is False or p["checksum_ok"] is False
        for p in report["programs"].values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
