"""AWQ on a real model, measured: activation-aware scales folded into the norms before 4-bit
weights (8da4w g32), against the same quantization without them.

    python bench/awq.py [--model smollm2-135m] [--paragraphs 12] [--qparams affine,hqq]
                        [--recipe] [--json bench/results/awq-smollm2-135m.json]

Eager, on our model, the same quantized tensors as a program (as ``bench/smoothquant.py``). Per
layer, four groups of linears share an input whose scale can be folded exactly: the RMSNorm
before q/k/v and before gate/up, ``wv``'s rows before ``wo`` (one scale per kv-head channel),
``w3``'s rows before ``w2``. AWQ's search: for each group, ``s = mean|x|^a`` (normalised), ``a``
in a grid, the one whose 4-bit weights ``Q(W s)`` give the least output error ``|| (x/s) Q(W s)^T
- x W^T ||`` on the calibration text's activations (the recipes' own text; 512 tokens). Every
linear is 8da4w g32, the output layer too or ``8w`` (as the default recipe has it); the
embedding stays float. Scored: mean KL divergence
and top-1 agreement against fp32 on held-out paragraphs (``held_out_text``).

``--recipe``: instead, the default recipe's linears (``q4_k_m``: GPTQ, the most sensitive third
of the weights ``8w``, the output layer ``8w``, HQQ scales; calibrated by
:func:`~edgelora.quant.calibrate.calibrate_model` as an export does) without and with AWQ's
scales folded first: does AWQ still win on top of GPTQ and the measured upgrades?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgelora.bench.smoothquant import (
    _logits,
    divergence,
    eager_study,
    fold_scales,
    quantized_divergence,
)
from edgelora.realmodels import MODELS

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def inputs_of(model, chunks, tokens: int) -> dict[str, torch.Tensor]:
    """Every linear's inputs over the calibration chunks (the first ``tokens`` rows)."""
    xs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):

            def hook(mod, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                xs[name] = torch.cat([xs[name], x]) if name in xs else x

            hooks.append(mod.register_forward_hook(hook))
    _logits(model, chunks)
    for h in hooks:
        h.remove()
    return {k: v[:tokens] for k, v in xs.items()}


def search(x: torch.Tensor, weights: list[torch.Tensor], fake) -> tuple[torch.Tensor, float]:
    """AWQ's grid search for one group: the scale with the least output error."""
    mean = x.abs().mean(0).clamp(min=1e-6)
    want = [x @ w.T for w in weights]
    best = (None, float("inf"), None)
    for a in GRID:
        s = mean**a
        s = s / (s.max() * s.min()).sqrt()
        err = sum(
            float(((x / s) @ fake(w * s).T - y).pow(2).mean())
            for w, y in zip(weights, want, strict=True)
        )
        if err < best[1]:
            best = (s, err, a)
    return best[0], best[2]


def awq(model, args, xs, fake) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` with AWQ's scales folded in, and the ``a`` chosen per group."""
    chosen = {}

    def scale_of(key, weights):
        s, chosen[key] = search(xs[key], weights, fake)
        return s

    return fold_scales(model, args, scale_of), chosen


def recipe_rows(model, args, xs, ids, ref, hf) -> dict:
    """q4_k_m's linears (eager), without and with AWQ folded before calibrating."""
    from edgelora.quant.calibrate import _fake_int4, calibrate_model, calibration_ids
    from edgelora.quant.recipe import preset

    r = preset("q4_k_m")
    cal = calibration_ids(None, hf / "tokenizer.json", args.vocab_size)
    rows = {}
    for use_awq in (False, True):
        t = time.perf_counter()
        base, chosen = model, {}
        if use_awq:
            base, chosen = awq(model, args, xs, lambda w: _fake_int4(w, r.group_size, r.qparams))
        result = calibrate_model(
            base, cal, group_size=r.group_size, gptq=r.gptq, upgrade=r.upgrade,
            upgrade_qmode=r.upgrade_qmode, qparams=r.qparams, exclude=frozenset({"output"}),
        )  # fmt: skip
        plan = {**result.plan, "output": r.output_qmode}
        kld, top1 = quantized_divergence(
            base, ref, ids, r.qmode, r.group_size, qparams=r.qparams, plan=plan,
            custom=result.custom,
        )  # fmt: skip
        name = "q4_k_m linears (GPTQ + 1/3 8w, output 8w)" + (" + AWQ" if use_awq else "")
        rows[name] = {"mean_kld": kld, "top1_agreement": top1, "upgraded": len(result.plan)}
        if use_awq:
            rows[name]["alphas"] = {str(a): list(chosen.values()).count(a) for a in GRID}
        print(f"{name}: KLD {kld:.4f}, top-1 {100 * top1:.1f}% "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    p.add_argument("--paragraphs", type=int, default=12, help="held-out paragraphs scored")
    p.add_argument("--qparams", default="affine,hqq")
    p.add_argument("--recipe", action="store_true", help="the default recipe's linears instead")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()

    from edgelora.quant.calibrate import _fake_int4

    hf, args, model, ids, cal = eager_study(ns.model, ns.paragraphs, 512)
    xs = inputs_of(model, [cal[i : i + 256] for i in range(0, len(cal), 256)], 512)
    ref = _logits(model, ids)

    rows = recipe_rows(model, args, xs, ids, ref, hf) if ns.recipe else {}
    plain = [] if ns.recipe else [(q, o) for q in ns.qparams.split(",") for o in ("8da4w", "8w")]
    for qparams, output in plain:
        for use_awq in (False, True):
            t = time.perf_counter()
            base, chosen = model, {}
            if use_awq:
                base, chosen = awq(model, args, xs, lambda w, q=qparams: _fake_int4(w, 32, q))
                exact = divergence(ref, _logits(base, ids))[0]
            kld, top1 = quantized_divergence(
                base, ref, ids, "8da4w", 32, qparams=qparams, plan={"output": output}
            )
            name = f"8da4w g32 {qparams}, output {output}" + (" + AWQ" if use_awq else "")
            rows[name] = {"mean_kld": kld, "top1_agreement": top1}
            if use_awq:
                rows[name]["smoothed_float_kld"] = exact
                rows[name]["alphas"] = {str(a): list(chosen.values()).count(a) for a in GRID}
            print(f"{name}: KLD {kld:.4f}, top-1 {100 * top1:.1f}% "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    result = {"model": ns.model, "tokens_scored": sum(map(len, ids)), "rows": rows}
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
