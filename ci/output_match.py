"""Output match: every exported program, run on the ExecuTorch runtime, against its eager model.

For an export directory (its ``manifest.json`` says how it was built) this rebuilds the eager
model of each program -- same seed/checkpoint, same quantization, same adapter -- and compares:

- logits, runtime vs eager, on the same sequence (the prompt followed by the eager model's
  greedy continuation): max abs diff within the tolerance for the quantization mode;
- greedy-token agreement on that sequence (teacher forced): the fraction of positions whose
  argmax agrees. Free-running decode is also run and its common prefix with the eager tokens
  reported, but not judged: one flip at a near-tie forks the rest of a random model's text;
- each adapter program vs the base program: the logits must differ (the adapter is applied);
- each adapter program also loads and runs with a *given* foundation (e.g. a base-only export's).

A program exported with ``--logits last`` returns the last position's logits only; they are
compared with the eager model's last position (and free-running decode covers the rest).

Tolerances (max abs logit diff, relative to the eager logits' max abs value):
- ``none`` (fp32): 1e-4. Same math in fp32; only XNNPACK's summation order differs.
- ``8da4w``/``8da8w``: 5e-2. The weights are bit-identical, but XNNPACK quantizes activations
  per row with its own rounding; one int8 step in a dot product of length ``dim`` moves a
  logit by about max|x|/127 times the weight norm, a few percent of the logit range.
- ``--dtype fp16``: at least 1e-2 and agreement >= 0.8 whatever the qmode: the eager model
  and XNNPACK both round every fp16 intermediate (eps 9.8e-4), in different orders.
Teacher-forced agreement must be >= 0.8 for quantized programs and 1.0 for fp32. A random
model's top two logits are often closer than the activation-quantization error (a flip needs
a margin below twice the max abs diff), so agreement there measures ties as much as error;
the logits tolerance is the primary check (stories15M + rank-16 adapters: 0.87-1.0 measured).

``python -m edgelora.ci.output_match OUT_DIR [--foundation PTD]`` prints one line per program
and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgelora.export.config import FoundationSpec
from edgelora.export.foundation import build_foundation
from edgelora.format.layout import FOUNDATION_FILE
from edgelora.format.manifest import AdapterEntry, Manifest, read_export
from edgelora.generation import Generation, greedy_generate
from edgelora.lora.attach import adapter_attached
from edgelora.models.args import ModelArgs
from edgelora.quant.linear import store_adapter_weights
from edgelora.runtime.program import LlamaProgram
from edgelora.weights.adapter_files import load_adapter

# 8w (int8 weights, fp32 activations): the eager model and XNNPACK's F32-QC8W multiply the
# same int8 weights by the same fp32 activations and scale per channel, in other orders: fp32
# rounding only (measured 1e-6 relative on the trained tiny model), so 1e-3 and every token.
REL_TOL = {"none": 1e-4, "8da4w": 5e-2, "8da8w": 5e-2, "8w": 1e-3}
MIN_AGREEMENT = {"none": 1.0, "8da4w": 0.8, "8da8w": 0.8, "8w": 1.0}
DTYPE_REL_TOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 5e-2}
DTYPE_MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.8, "bf16": 0.8}
DEFAULT_PROMPT = [1, 5, 9, 14, 3, 27, 8, 2]


@dataclass
class ProgramMatch:
    name: str
    max_abs_diff: float
    rel_diff: float  # max_abs_diff / max |eager logits|
    tolerance: float
    token_agreement: float
    min_agreement: float
    diff_from_base: float | None  # max abs diff of this program's logits vs the base program's
    loads_with_foundation: bool
    free_running_prefix: int = 0  # generated tokens equal to eager's before the first difference
    generated: int = 0

    def failures(self) -> list[str]:
        """The checks this program fails, each as a short reason (empty when it passes)."""
        reasons = []
        if self.rel_diff > self.tolerance:
            reasons.append(f"rel diff {self.rel_diff:.2g} > {self.tolerance:g}")
        if self.token_agreement < self.min_agreement:
            reasons.append(f"greedy agreement {self.token_agreement:.2f} < {self.min_agreement:g}")
        # An adapter's effect must stand clear of the export error, or the check cannot tell an
        # applied adapter from a dropped one.
        if self.diff_from_base is not None and self.diff_from_base <= 10 * self.max_abs_diff:
            reasons.append(
                f"adapter effect {self.diff_from_base:.3g} not > 10x export error "
                f"{self.max_abs_diff:.3g}"
            )
        if not self.loads_with_foundation:
            reasons.append("does not load with the given foundation")
        return reasons

    @property
    def ok(self) -> bool:
        return not self.failures()

    def line(self) -> str:
        base = "" if self.diff_from_base is None else f", vs base {self.diff_from_base:.3g}"
        return (
            f"{'PASS' if self.ok else 'FAIL'} {self.name}: max abs diff {self.max_abs_diff:.3g} "
            f"(rel {self.rel_diff:.2g} <= {self.tolerance:g}), greedy agreement "
            f"{self.token_agreement:.2f} (>= {self.min_agreement:g}){base}, free-running "
            f"{self.free_running_prefix}/{self.generated} tokens equal, loads with "
            f"foundation: {self.loads_with_foundation}"
            + "".join(f"\n  why: {r}" for r in self.failures())
        )


def eager_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> Generation:
    """The runtime's greedy loop on an eager ``Transformer`` (the reference of output matching)."""
    model.reset_cache()

    def forward(tokens: list[int], start: int) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens]), torch.tensor([start]))[0]

    return greedy_generate(forward, prompt, max_new_tokens)


def eager_reference(manifest: Manifest, merged=None, out_dir=None):
    """The eager model of an export's foundation: same seed or checkpoint, same quantization,
    full logits and plain attention (the reference every program is compared with). A
    calibrating recipe calibrates again on the export's tokenizer (``out_dir``); calibration
    always runs plain attention, so its weights are the export's."""
    # plain attention and every position's logits, whatever the export traced
    spec = FoundationSpec.of_export(manifest, out_dir, sdpa="plain", logits="all")
    model, _, _ = build_foundation(ModelArgs.from_dict(manifest.model), spec, merge=merged)
    return model


def match_export(
    out_dir: str | Path,
    *,
    foundation: str | Path | None = None,
    prompt: list[int] = DEFAULT_PROMPT,
    max_new_tokens: int = 16,
) -> list[ProgramMatch]:
    """Compare every program of ``out_dir`` with its eager model; see the module docstring."""
    out_dir = Path(out_dir)
    manifest = read_export(out_dir)
    args = ModelArgs.from_dict(manifest.model)
    q, dtype = manifest.quantization, manifest.dtype
    # a mixed recipe is held to its loosest precision (e.g. 8w linears beside 8da4w ones)
    qmodes = {q.qmode, *(mode for mode, _ in q.tensors.values())}
    rel_tol = max(REL_TOL[m] for m in qmodes)
    min_agreement = min(MIN_AGREEMENT[m] for m in qmodes)

    def adapter_of(entry: AdapterEntry, name: str):
        return load_adapter(entry.source, args, name, scale=entry.scale)

    merged = next(
        (adapter_of(p.merged_adapter, n) for n, p in manifest.programs.items() if p.merged_adapter),
        None,
    )
    model = eager_reference(manifest, merged, out_dir)
    own_foundation = out_dir / FOUNDATION_FILE
    results, base_logits = [], None
    for name, prog in manifest.programs.items():
        adapter = None if prog.adapter is None else adapter_of(prog.adapter, name)
        with adapter_attached(model, adapter):
            store_adapter_weights(model, prog.adapter_dtype)  # as the program's (the copies)
            eager = eager_generate(model, prompt, max_new_tokens)
            seq = prompt + eager.tokens[:-1]  # positions whose next-token argmax we compare
            model.reset_cache()
            with torch.no_grad():
                want = model(torch.tensor([seq]), torch.tensor([0]))[0]
        program = LlamaProgram(out_dir / prog.file, own_foundation)
        got = program.forward(seq, 0)
        want = want[-got.shape[0] :]  # an --logits last program returns the last row only
        free = program.generate(prompt, max_new_tokens).tokens
        diff = (got - want).abs().max().item()
        scale = want.abs().max().item()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        prefix = next(
            (i for i, (a, b) in enumerate(zip(free, eager.tokens, strict=False)) if a != b),
            len(free),
        )
        if name == "base":
            base_logits = got
        vs_base = None
        if prog.adapter is not None and base_logits is not None:
            vs_base = (got - base_logits).abs().max().item()
        loads = True
        if foundation is not None:
            other = LlamaProgram(out_dir / prog.file, foundation).forward(seq, 0)
            loads = bool(torch.equal(other, got))
        results.append(
            ProgramMatch(
                name,
                diff,
                diff / max(scale, 1e-12),
                max(rel_tol, DTYPE_REL_TOL[dtype]),
                agree,
                min(min_agreement, DTYPE_MIN_AGREEMENT[dtype]),
                vs_base,
                loads,
                prefix,
                len(free),
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edgelora.ci.output_match",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", type=Path, help="an export_llama output directory")
    p.add_argument(
        "--base-export",
        type=Path,
        default=None,
        metavar="DIR",
        help="a base-only export of the same foundation settings: its foundation.ptd must be "
        "byte-identical to OUT_DIR's, and every program must give identical logits with it",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ns = p.parse_args(argv)
    ok = True
    foundation = None
    if ns.base_export is not None:
        foundation = ns.base_export / FOUNDATION_FILE
        same = foundation.read_bytes() == (ns.out_dir / FOUNDATION_FILE).read_bytes()
        ok = same
        print(
            f"{'PASS' if same else 'FAIL'} {FOUNDATION_FILE} "
            f"{'byte-identical' if same else 'differs'} between {ns.base_export} and "
            f"{ns.out_dir} ({foundation.stat().st_size} bytes)"
        )
    results = match_export(ns.out_dir, foundation=foundation)
    for r in results:
        print(r.line())
    if ns.json:
        ns.json.write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=2))
    return 0 if ok and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
