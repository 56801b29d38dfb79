"""SmoothQuant on a real model, measured: can int8 dynamic activations (8da8w, XNNPACK's
QD8-F32-QC8W) with activation scales migrated into the weights replace the 8-bit preset's
int8 weights under fp32 activations (8w, F32-QC8W)?

    python bench/smoothquant.py [--model smollm2-135m] [--alphas 0.4,0.5,0.6] [--paragraphs 12]
                                [--json bench/results/smoothquant-smollm2-135m.json]
                                [--decode WORK [--rounds 5]]

Eager, on our model: the same quantized tensors as a program, without lowering, so a sweep takes
seconds. The scales are SmoothQuant's, ``s = max|x|^a / max|W|^(1-a)`` per input channel, with
``max|x|`` over the calibration text (the recipes' own, ``default_calibration_text``), folded
exactly where the float model allows: into the RMSNorm before q/k/v and gate/up, into
``wv``'s rows before ``wo`` (one scale per kv-head channel) and ``w3``'s rows before ``w2``
(float KL divergence of the smoothed model against the original: ~1e-11). Scored: mean KL
divergence and top-1 agreement against the fp32 model on held-out paragraphs (the quality
bench's text, ``held_out_text``).

``--decode WORK`` also exports ``base.pte`` with every linear ``8w`` (the ``q8_0`` preset) and
with every linear ``8da8w``, beside the old 4-bit default and ``q4_k_m`` (reused when ``WORK``
has them), and times decode in alternating rounds in this one process, at 1 and 2 threads:
whether the faster kernel would buy back what the bytes cost. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from edgelora.realmodels import MODELS, hf_dir


def _logits(model, ids):
    out = []
    with torch.no_grad():
        for seq in ids:
            model.reset_cache()
            out.append(model(torch.tensor([seq]), torch.tensor([0])).float()[0])
    return out


def quantized_divergence(model, ref, ids, qmode: str, group_size: int, **kw) -> tuple[float, float]:
    """:func:`divergence` of a copy of ``model`` quantized by
    :func:`~edgelora.quant.linear.quantize_linears` (``kw``: its qparams, plan, custom)."""
    from edgelora.quant.linear import quantize_linears

    quantized = copy.deepcopy(model)
    quantize_linears(quantized, qmode, group_size, **kw)
    return divergence(ref, _logits(quantized, ids))


def divergence(ref, got) -> tuple[float, float]:
    """Mean KL(ref || got) per position and top-1 agreement."""
    kl, same, n = 0.0, 0, 0
    for r, g in zip(ref, got, strict=True):
        r, g = r.double().log_softmax(-1), g.double().log_softmax(-1)
        kl += float((r.exp() * (r - g)).sum())
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return kl / n, same / n


def eager_study(name: str, paragraphs: int, calibration_tokens: int):
    """The real model ``name`` as our eager fp32 model, the ids of ``paragraphs`` held-out
    paragraphs (256 tokens each at most) and of the calibration text: what the eager quantization
    studies (this one, ``bench/awq.py``) score and calibrate on."""
    from tokenizers import Tokenizer

    from edgelora.export.cli import resolve_model_args
    from edgelora.models.llama import build_model
    from edgelora.quant.calibrate import default_calibration_text, held_out_text
    from edgelora.weights.checkpoint import open_checkpoint

    hf = hf_dir(MODELS[name])
    ckpt = open_checkpoint(hf)
    args = resolve_model_args(None, ckpt, 512)
    model = build_model(args, sdpa="plain")
    model.load_state_dict({k: v.float() for k, v in ckpt.take_state_dict().items()}, strict=False)
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = [tok.encode(t).ids[:256] for t in held_out_text()[:paragraphs]]
    cal = tok.encode(default_calibration_text()).ids[:calibration_tokens]
    return hf, args, model, ids, cal


def input_maxima(model, chunks) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every linear over the calibration chunks."""
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(mod, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0)
                stats[name] = torch.maximum(stats.get(name, x), x)

            hooks.append(mod.register_forward_hook(hook))
    _logits(model, chunks)
    for h in hooks:
        h.remove()
    return stats


def fold_scales(model, args, scale_of):
    """A copy of ``model`` with a per-input-channel scale folded in, float-equivalent, for each
    group of linears sharing an input: ``scale_of(key, weights)`` gives it (``key``: the FQN of
    the group's first linear, ``weights``: the group's weights). The norm before q/k/v and before
    gate/up divides by it; ``wv``'s rows before ``wo`` (one scale per kv-head channel) and
    ``w3``'s rows before ``w2`` do."""
    model = copy.deepcopy(model)
    rep = args.n_heads // args.kv_heads
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            att, ff, p = layer.attention, layer.feed_forward, f"layers.{i}."
            for norm, lins, key in (
                (layer.attention_norm, (att.wq, att.wk, att.wv), "attention.wq"),
                (layer.ffn_norm, (ff.w1, ff.w3), "feed_forward.w1"),
            ):
                s = scale_of(p + key, [lin.weight for lin in lins])
                norm.weight.div_(s)
                for lin in lins:
                    lin.weight.mul_(s)
            s = scale_of(p + "feed_forward.w2", [ff.w2.weight])
            ff.w3.weight.div_(s[:, None])
            ff.w2.weight.mul_(s)
            s = scale_of(p + "attention.wo", [att.wo.weight])
            s = s.view(args.kv_heads, rep, args.head_dim).amax(1)  # query heads share a kv head
            att.wv.weight.div_(s.reshape(-1)[:, None])
            att.wo.weight.mul_(s[:, None, :].expand(-1, rep, -1).reshape(-1))
    return model


def smooth(model, args, maxima, alpha: float):
    """A copy of ``model`` with SmoothQuant's scales folded in (float-equivalent)."""

    def scales(key, weights):
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        amax = maxima[key].clamp(min=1e-5)
        return (amax**alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    return fold_scales(model, args, scales)


# --decode's exports: name -> export_llama flags
DECODE = {
    "old-default": ["--recipe", "q4_0", "--embedding-bits", "0", "--output-bits", "0"],
    "q4_k_m": ["--recipe", "q4_k_m"],
    "q8_0 (8w)": ["--recipe", "q8_0"],
    "8da8w": ["--recipe", "q8_0", "--qmode", "8da8w", "--group-size", "0", "--output-bits", "8"],
}


def decode(hf: Path, work: Path, rounds: int) -> dict:
    """Decode ms/token (median over ``rounds`` of a 64-step generation) of each --decode export,
    alternating, at 1 and 2 threads."""
    import statistics

    from edgelora.bench.common import export
    from edgelora.runtime.native import set_threads
    from edgelora.runtime.program import LlamaProgram, register_kernels

    out = {}
    for name, flags in DECODE.items():
        d = work / name.split()[0]
        if not (d / "base.pte").is_file():
            print(f"exporting {name} ...", flush=True)
            export(flags, hf, d)
        out[name] = d
    register_kernels()
    result = {}
    prompt = [(7 * i) % 40000 + 3 for i in range(16)]
    for threads in (1, 2):
        set_threads(threads)
        programs = {n: LlamaProgram(d / "base.pte", d / "foundation.ptd") for n, d in out.items()}
        samples = {n: [] for n in programs}
        for _ in range(rounds):
            for n, prog in programs.items():
                samples[n].append(prog.generate(prompt, 64).decode_ms_per_token)
        for n, v in samples.items():
            result.setdefault(n, {})[f"decode_ms_{threads}t"] = statistics.median(v)
            print(f"{n}, {threads} thread(s): {statistics.median(v):.2f} ms/token", flush=True)
    for n, d in out.items():
        result[n]["foundation_bytes"] = (d / "foundation.ptd").stat().st_size
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    p.add_argument("--alphas", default="0.4,0.5,0.6")
    p.add_argument("--paragraphs", type=int, default=12, help="held-out paragraphs scored")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--decode", type=Path, default=None, metavar="WORK", help="also time decode")
    p.add_argument("--rounds", type=int, default=5, help="--decode's alternating rounds")
    ns = p.parse_args()

    hf, args, model, ids, cal = eager_study(ns.model, ns.paragraphs, 2048)
    maxima = input_maxima(model, [cal[i : i + 256] for i in range(0, len(cal), 256)])
    ref = _logits(model, ids)

    rows = {}
    candidates = [("8w", None), ("8da8w", None)]
    candidates += [("8da8w", float(a)) for a in ns.alphas.split(",")]
    for qmode, alpha in candidates:
        t = time.perf_counter()
        base = model if alpha is None else smooth(model, args, maxima, alpha)
        exact = 0.0 if alpha is None else divergence(ref, _logits(base, ids))[0]
        kld, top1 = quantized_divergence(base, ref, ids, qmode, 0, qparams="affine")
        name = qmode if alpha is None else f"{qmode} + SmoothQuant a={alpha}"
        rows[name] = {"mean_kld": kld, "top1_agreement": top1, "smoothed_float_kld": exact}
        print(f"{name}: KLD {kld:.5f}, top-1 {100 * top1:.1f}% ({time.perf_counter() - t:.0f} s)")
    result = {
        "model": ns.model,
        "tokens_scored": sum(map(len, ids)),
        "calibration_tokens": len(cal),
        "rows": rows,
    }
    if ns.decode is not None:
        result["decode"] = decode(hf, ns.decode, ns.rounds)
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
