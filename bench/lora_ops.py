"""The floor under an adapter program's decode cost: its LoRA linears alone, on XNNPACK.

    python bench/lora_ops.py [--config stories15m] [--rank 16] [--rounds 7] [--json OUT.json]

For a ``bench/spine.py`` config's shapes, lowers a module that runs exactly the ops an adapter
program adds per token -- for every layer, ``lora_A`` and ``lora_B`` of the seven projections
and the seven adds of their outputs, the scale folded into ``lora_B`` -- once with fp32 weights
and once with int8 weights (``--adapter-dtype int8``: XNNPACK's F32-QC8W linear), and a module
of one op as the reference. It times a call of each on the ExecuTorch runtime (alternating
rounds, medians, for each ``--threads`` size) and reports the adapter's microseconds per token
and, if ``bench/results/adapters-CONFIG.json`` has base.pte's decode time, the ratio that cost
alone would give. Its inputs and weights stay in the cache between calls, so this is a floor:
in a program, the adapter's weights come back from memory after the 4-bit base weights have
gone through the cache.

It also times the *stacked* layout (``int8-stacked``, ``fp32-stacked``): the projections that
share an input (q/k/v, gate/up) as one ``lora_A`` of their summed rank and one block-diagonal
``lora_B`` -- three ops per group instead of three per projection (12 instead of 21 per layer),
for B's zeros in bytes and compute. It tells whether the op count or the ops' own work sets the
floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _modules(config: str, rank: int) -> tuple[dict[str, nn.Module], tuple[int, int]]:
    """The reference and the fp32 and int8 adapters (seeded weights) in the split and the
    stacked layout, and ``(dim, hidden)``."""
    from edgelora.bench.common import CONFIGS
    from edgelora.lora.modules import LoRAWrapper
    from edgelora.models.args import ModelArgs
    from edgelora.quant.linear import quantize_adapter_weights

    args = ModelArgs.from_dict(CONFIGS[config])
    dim, hidden = args.dim, args.ffn_hidden_dim

    class Delta(LoRAWrapper):
        """An adapter without its base layer: ``lora_b(lora_a(x))``; with ``blocks`` > 1,
        that many projections' adapters stacked (block-diagonal ``lora_b``)."""

        def __init__(self, n_in: int, n_out: int, blocks: int = 1) -> None:
            super().__init__()
            self.lora_a = nn.Linear(n_in, rank * blocks, bias=False)
            self.lora_b = nn.Linear(rank * blocks, n_out * blocks, bias=False)
            with torch.no_grad():
                self.lora_b.weight.normal_(std=0.02)
                self.lora_b.weight.mul_(torch.block_diag(*[torch.ones(n_out, rank)] * blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lora_b(self.lora_a(x))

    class Adapter(nn.Module):
        """Per layer: q, k, v, o, down added into ``x``; gate, up into ``h`` (7 adds)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            shapes = {"q": (dim, dim), "k": (dim, dim), "v": (dim, dim), "o": (dim, dim),
                      "gate": (dim, hidden), "up": (dim, hidden), "down": (hidden, dim)}  # fmt: skip
            self.layers = nn.ModuleList(
                nn.ModuleDict({n: Delta(*s) for n, s in shapes.items()})
                for _ in range(args.n_layers)
            )

        def forward(self, x: torch.Tensor, h: torch.Tensor, qkv: torch.Tensor, gu: torch.Tensor):
            for p in self.layers:
                x, h = (
                    x + p["q"](x) + p["k"](x) + p["v"](x) + p["o"](x) + p["down"](h),
                    (h + p["gate"](x) + p["up"](x)),
                )
            return x, h

    class Stacked(nn.Module):
        """Per layer: q/k/v as one adapter added into ``qkv``, gate/up as one into ``gu``, o
        and down into ``x`` (4 adds)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(
                nn.ModuleDict({"qkv": Delta(dim, dim, 3), "o": Delta(dim, dim),
                               "gate_up": Delta(dim, hidden, 2), "down": Delta(hidden, dim)})
                for _ in range(args.n_layers)
            )  # fmt: skip

        def forward(self, x: torch.Tensor, h: torch.Tensor, qkv: torch.Tensor, gu: torch.Tensor):
            for p in self.layers:
                qkv, gu = qkv + p["qkv"](x), gu + p["gate_up"](x)
                x = x + p["o"](x) + p["down"](h)
            return x, h, qkv, gu

    class Reference(nn.Module):
        def forward(self, x: torch.Tensor, h: torch.Tensor, qkv: torch.Tensor, gu: torch.Tensor):
            return x * 1.0, h

    modules: dict[str, nn.Module] = {"reference": Reference()}
    for suffix, layout in (("", Adapter), ("-stacked", Stacked)):
        modules["fp32" + suffix] = layout().eval()
        modules["int8" + suffix] = int8 = layout().eval()
        quantize_adapter_weights(int8)
    return modules, (dim, hidden)


def measure(config: str, rank: int, rounds: int, threads: list[int]) -> dict:
    from edgelora.backends.xnnpack.lower import lower_to_xnnpack

    modules, (dim, hidden) = _modules(config, rank)
    inputs = tuple(torch.randn(1, 1, n) * 0.1 for n in (dim, hidden, 3 * dim, 2 * hidden))
    result: dict = {"config": config, "rank": rank, "rounds": rounds, "us_per_token": {}}
    with tempfile.TemporaryDirectory(prefix="edgelora-lora-ops-") as tmp:
        paths = {}
        for name, module in modules.items():
            ep = torch.export.export(module, inputs)
            lowered = lower_to_xnnpack(ep, is_adapter=lambda fqn: True)  # every constant inline
            paths[name] = Path(tmp) / f"{name}.pte"
            paths[name].write_bytes(lowered.manager.buffer)
        for n in threads:
            us = _time(paths, inputs, rounds, n)
            result["us_per_token"][f"{n} threads"] = {
                k: us[k] - us["reference"] for k in us if k != "reference"
            }
    base = ROOT / "bench" / "results" / f"adapters-{config}.json"
    if base.is_file():
        ms = json.loads(base.read_text()).get("decode_ms_per_token", {})
        result["floor_vs_base"] = {
            key: {k: 1 + us / 1000 / ms[key]["base.pte"] for k, us in v.items()}
            for key, v in result["us_per_token"].items()
            if key in ms
        }
    return result


def _time(paths: dict[str, Path], inputs: tuple, rounds: int, threads: int) -> dict[str, float]:
    """Median microseconds per call of each program with ``threads`` XNNPACK threads, over
    ``rounds`` rounds alternating over them (20 warm-up calls, then 200 timed)."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)  # before loading: a loaded program keeps it
    methods = {k: Runtime.get().load_program(p).load_method("forward") for k, p in paths.items()}
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for k, method in methods.items():
            for _ in range(20):
                method.execute(list(inputs))
            t = time.perf_counter()
            for _ in range(200):
                method.execute(list(inputs))
            samples[k].append((time.perf_counter() - t) / 200 * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="stories15m")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--threads", type=lambda s: [int(t) for t in s.split(",")], default=[2, 1],
        help="XNNPACK threadpool sizes (default 2,1)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    from edgelora._quiet import quiet_third_party

    quiet_third_party()
    result = measure(ns.config, ns.rank, ns.rounds, ns.threads)
    print(json.dumps(result, indent=1))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
