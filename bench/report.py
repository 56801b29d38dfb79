"""The harness's figures, Markdown table and plots, from its measurements (``bench/run.py``
measures; this module only computes and draws, so ``--render`` can re-make a report)."""

from __future__ import annotations

from pathlib import Path

ADAPTER = "a0"
# Both return the last position's logits only, as the example's programs do by default.
VARIANTS = {
    "split": ["--fuse", "none", "--logits", "last"],
    "fused": [
        "--fuse", "all", "--embedding-bits", "4", "--embedding-group-size", "32",
        "--logits", "last",
    ],
}  # fmt: skip


def _bytes_per_token(files: dict[str, int], params: dict, variant: str) -> int:
    """Weight bytes a decode step reads: the foundation minus the embedding table and its
    scales (one row of them is read per token)."""
    rows, dim = params["vocab_size"], params["dim"]
    flags = VARIANTS[variant]
    bits = int(flags[flags.index("--embedding-bits") + 1]) if "--embedding-bits" in flags else 0
    if bits:
        group = int(flags[flags.index("--embedding-group-size") + 1]) or dim
        emb = rows * dim * bits / 8 + rows * (dim // group) * 4  # fp32 scales
    else:
        emb = rows * dim * 4
    return int(files["foundation.ptd"] - emb + emb / rows)


def bound(files: dict[str, int], params: dict, variant: str, bw: float, base_ms: float) -> dict:
    per_token = _bytes_per_token(files, params, variant)
    bound_ms = 1e3 * per_token / bw
    return {
        "weight_bytes_per_token": per_token,
        "decode_bound_ms": bound_ms,
        "base_over_bound": base_ms / bound_ms,
    }


def figures_of(config, params, exports, median, runs, bandwidth, adapter_bytes) -> dict:
    bw = bandwidth["read_gb_per_s"] * 1e9
    decode = {k: v["decode_ms_per_token"] for k, v in median.items()}
    out = {
        "config": config,
        "model": params,
        "adapter": {"rank": 16, "targets": "all projections", "bytes_fp32": adapter_bytes},
        "bandwidth": bandwidth,
        "exports": {},
        "median": median,
        "runs": runs,
        "bound": {},
        "ratios": {},
    }
    for name, rec in exports.items():
        if name == "executorch":
            out["exports"][name] = {
                role: {k: v for k, v in r.items() if k != "program"} for role, r in rec.items()
            }
            continue
        out["exports"][name] = {k: v for k, v in rec.items() if k != "programs"}
        out["exports"][name]["adapter_pte_over_weights"] = (
            rec["files"][f"{ADAPTER}.pte"] / adapter_bytes
        )
        out["bound"][name] = bound(
            rec["files"], params, name.removeprefix("ours-"), bw, decode[f"{name}/base"]
        )
    et = exports.get("executorch")
    for name in [n for n in exports if n.startswith("ours-")]:
        r = out["ratios"].setdefault(name, {})
        r["lora_over_base_decode"] = decode[f"{name}/lora"] / decode[f"{name}/base"]
        if et is not None:
            r["base_decode_over_executorch"] = decode[f"{name}/base"] / decode["executorch/base"]
            r["lora_decode_over_executorch"] = decode[f"{name}/lora"] / decode["executorch/lora"]
            et_wall = et["base"]["wall_s"] + et["lora"]["wall_s"]
            r["export_wall_over_executorch"] = exports[name]["wall_s"] / et_wall
            r["adapter_export_over_executorch_lora_export"] = (
                exports[name]["adapter_export_s"] / et["lora"]["wall_s"]
            )
            ours_bytes = sum(
                n for f, n in exports[name]["files"].items() if f.endswith((".pte", ".ptd"))
            )
            et_ptes = sum(
                n for r_ in et.values() for f, n in r_["files"].items() if f.endswith(".pte")
            )
            et_ptds = [
                n for r_ in et.values() for f, n in r_["files"].items() if f.endswith(".ptd")
            ]
            # one foundation on the device if the example's two are identical
            et_bytes = et_ptes + (
                max(et_ptds) if et["base"]["foundation_shared_with_lora"] else sum(et_ptds)
            )
            r["device_bytes_over_executorch"] = ours_bytes / et_bytes
    return out


def markdown(f: dict) -> str:
    lines = [
        f"## {f['config']}: {f['model']['dim']} dim, {f['model']['n_layers']} layers, "
        f"vocab {f['model']['vocab_size']}; rank-16 adapter on all projections",
        "",
        f"Memory read bandwidth: {f['bandwidth']['read_gb_per_s']:.1f} GB/s "
        f"({f['bandwidth']['threads']} threads).",
        "",
        "| program | decode ms/token | prefill 128 tok/s | TTFT ms |",
        "|---|---|---|---|",
    ]
    for k, v in f["median"].items():
        lines.append(
            f"| {k} | {v['decode_ms_per_token']:.3f} | {v['prefill_tokens_per_s']:.0f} | "
            f"{v['time_to_first_token_ms']:.1f} |"
        )
    lines += ["", "| export | wall s | peak RSS MiB | files (bytes) |", "|---|---|---|---|"]
    for k, v in f["exports"].items():
        recs = v.items() if k == "executorch" else [("", v)]
        for role, r in recs:
            files = ", ".join(f"{n} {s:,}" for n, s in r["files"].items())
            label = f"{k}/{role}" if role else k
            lines.append(f"| {label} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {files} |")
    lines += ["", *_bytes_for_k_adapters(f["exports"])]
    lines += [
        "",
        "| ours | decode bound ms | base / bound | 4-bit GEMMs ms (ETDump) / bound | ratios |",
        "|---|---|---|---|---|",
    ]
    for k, b in f["bound"].items():
        ratios = ", ".join(f"{n} {x:.3f}" for n, x in f["ratios"].get(k, {}).items())
        gemm = (
            f"{b['gemm_4bit_ms']:.3f} / {b['gemm_4bit_over_bound']:.2f}"
            if "gemm_4bit_ms" in b
            else "-"
        )
        lines.append(
            f"| {k} | {b['decode_bound_ms']:.3f} | {b['base_over_bound']:.2f} | {gemm} | {ratios} |"
        )
    if f.get("profile"):
        lines += [
            "",
            "| base program (ETDump, 32 steps) | step ms | delegate ms (calls) | 4-bit GEMMs ms "
            "| outside delegates ms (ops) |",
            "|---|---|---|---|---|",
        ]
        for k, r in f["profile"].items():
            lines.append(
                f"| {k} | {r['step_ms']:.3f} | {r['delegate_ms']:.3f} ({r['delegate_calls']}) "
                f"| {r['gemm_4bit_ms']:.3f} | {r['portable_ms']:.3f} ({r['portable_ops']}) |"
            )
    return "\n".join(lines) + "\n"


def _bytes_for_k_adapters(exports: dict, ks=(1, 2, 4, 8)) -> list[str]:
    """Markdown rows: bytes on the device for the base and k adapters. Every adapter is the
    same size (rank 16 on every projection), so the k-th adds one adapter program; the
    example's LoRA export writes its own foundation, counted once when it equals the base's."""
    head = "| MB on device, base + k adapters | " + " | ".join(f"k={k}" for k in ks) + " |"
    rows = [head, "|---|" + "---|" * len(ks)]
    for name, rec in exports.items():
        if name == "executorch":
            base, lora = rec["base"]["files"], rec["lora"]["files"]
            fixed = sum(base.values())
            per = sum(n for f, n in lora.items() if f.endswith(".pte"))
            if not rec["base"].get("foundation_shared_with_lora"):
                per += sum(n for f, n in lora.items() if f.endswith(".ptd"))
        else:
            files = rec["files"]
            per = files[f"{ADAPTER}.pte"]
            fixed = sum(n for f, n in files.items() if f.endswith((".pte", ".ptd"))) - per
        cells = " | ".join(f"{(fixed + k * per) / 1e6:.2f}" for k in ks)
        rows.append(f"| {name} | {cells} |")
    return rows


def plots(f: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(f["median"])
    med = [f["median"][n]["decode_ms_per_token"] for n in names]
    rounds = [[r["decode_ms_per_token"] for r in f["runs"][n]] for n in names]
    spread = [
        [m - min(r) for m, r in zip(med, rounds, strict=True)],
        [max(r) - m for m, r in zip(med, rounds, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names, med, xerr=spread, color="#4878a8", ecolor="#333333", capsize=3)
    for y, (m, r) in enumerate(zip(med, rounds, strict=True)):
        ax.text(max(r) * 1.08, y, f"{m:.2f}", va="center", fontsize=8)
    for b in f["bound"].values():
        ax.axvline(b["decode_bound_ms"], ls="--", color="#a84848", lw=1)
    ax.set_xscale("log")  # eager references are 10-100x the programs
    ax.set_xlabel(
        "decode ms/token, log scale (median of rounds, bars: min-max; dashed: bandwidth bound)"
    )
    ax.set_title(f"{f['config']}: decode")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(stem.with_name(f"{stem.name}-decode.png"), dpi=100)
    plt.close(fig)

    rows = []
    for k, v in f["exports"].items():
        recs = v.items() if k == "executorch" else [("", v)]
        for role, r in recs:
            for n, s in r["files"].items():
                if n.endswith((".pte", ".ptd")):
                    rows.append((f"{k}{'/' + role if role else ''}: {n}", s / 1e6))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="#58a058")
    for y, (_, mb) in enumerate(rows):
        ax.text(mb, y, f" {mb:.2f}", va="center", fontsize=8)
    ax.set_xlabel("MB")
    ax.set_title(f"{f['config']}: files on device")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(stem.with_name(f"{stem.name}-sizes.png"), dpi=100)
    plt.close(fig)
