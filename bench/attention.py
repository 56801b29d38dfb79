"""Plain PyTorch attention vs ExecuTorch's custom SDPA/KV-cache ops, base and adapter programs.

``python bench/attention.py [--config stories15m] [--fuse all] [--json OUT.json]`` exports the
same random model (8da4w g32, base + rank-16 adapter on every projection) with ``--sdpa plain``
and ``--sdpa custom`` and measures decode ms/token and prefill tokens/s alternately in one run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgelora.bench.common import CONFIGS  # noqa: E402
from edgelora.bench.fuse import compare, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="stories15m")
    p.add_argument("--fuse", default="all", help="--fuse mode of both exports")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    figures = compare(
        ns.config,
        {sdpa: {"fuse": ns.fuse, "sdpa": sdpa} for sdpa in ("plain", "custom")},
        ns.rounds,
    )
    d = figures["decode_ms_per_token"]
    figures["ratios"] = {
        "plain_base_over_custom_base": d["plain/base"] / d["custom/base"],
        "plain_lora_over_custom_lora": d["plain/lora"] / d["custom/lora"],
        "custom_lora_over_custom_base": d["custom/lora"] / d["custom/base"],
        "plain_lora_over_plain_base": d["plain/lora"] / d["plain/base"],
    }
    write(figures, ns.json)


if __name__ == "__main__":
    main()
