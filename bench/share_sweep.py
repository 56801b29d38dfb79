"""How much of the linears must be 8-bit for an 8-bit preset's quality: the default recipe's
measured upgrades, swept over the share of the weights they cover.

    python bench/share_sweep.py [--model smollm2-135m] [--paragraphs 12]
                                [--shares 0.125,0.333,0.5,0.667,0.833,1]
                                [--json bench/results/share-sweep-smollm2-135m.json]

Eager, on our model (as ``bench/awq.py``): one calibration as an export runs it (GPTQ for every
linear, each linear's divergence alone at 4 bits), then for each share the linears
:func:`~edgelora.quant.calibrate.upgrade_plan` picks are ``8w`` and the rest keep their GPTQ
weights; the output layer ``8w``, HQQ scales, the embedding float. Scored: mean KL divergence
and top-1 agreement against fp32 on held-out paragraphs. Share 1/3 is ``q4_k_m``, 1/8
``q4_k_s``; share 1 is every linear ``8w``, as ``q8_0``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgelora.bench.smoothquant import _logits, eager_study, quantized_divergence
from edgelora.realmodels import MODELS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    p.add_argument("--paragraphs", type=int, default=12, help="held-out paragraphs scored")
    p.add_argument("--shares", default="0.125,0.333,0.5,0.667,0.833,1")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()

    from edgelora.quant.calibrate import calibrate_model, calibration_ids, upgrade_plan
    from edgelora.quant.recipe import preset

    hf, args, model, ids, _ = eager_study(ns.model, ns.paragraphs, 0)
    ref = _logits(model, ids)
    r = preset("q4_k_m")
    cal = calibration_ids(None, hf / "tokenizer.json", args.vocab_size)
    t = time.perf_counter()
    # a share too small to pick any linear: every linear's GPTQ weights and divergence
    result = calibrate_model(
        model, cal, group_size=r.group_size, gptq=r.gptq, upgrade=1e-9,
        upgrade_qmode=r.upgrade_qmode, qparams=r.qparams, exclude=frozenset({"output"}),
    )  # fmt: skip
    print(f"calibrated in {time.perf_counter() - t:.0f} s", flush=True)
    sizes = {f: model.get_submodule(f).weight.numel() for f in result.sensitivity}
    rows = {}
    for share in (float(s) for s in ns.shares.split(",")):
        chosen = upgrade_plan(result.sensitivity, sizes, share)
        custom = {f: v for f, v in result.custom.items() if f not in chosen}
        plan = {**{f: r.upgrade_qmode for f in chosen}, "output": r.output_qmode}
        kld, top1 = quantized_divergence(
            model, ref, ids, r.qmode, r.group_size, qparams=r.qparams, plan=plan, custom=custom
        )
        covered = sum(sizes[f] for f in chosen) / sum(sizes.values())
        rows[f"{share:g}"] = {
            "upgraded_linears": len(chosen),
            "upgraded_weight_share": covered,
            "mean_kld": kld,
            "top1_agreement": top1,
        }
        print(f"share {share:g}: {len(chosen)} linears ({100 * covered:.0f}% of the weights) 8w, "
              f"KLD {kld:.4f}, top-1 {100 * top1:.1f}%", flush=True)  # fmt: skip
    out = {"model": ns.model, "tokens_scored": sum(map(len, ids)), "rows": rows}
    if ns.json is not None:
        ns.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
