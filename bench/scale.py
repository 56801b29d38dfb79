"""Real model sizes: peak memory, time per stage and file sizes of an export with one adapter.

    python bench/scale.py [--model llama-3.2-1b|llama-3.2-3b|qwen3-4b] [--layers N]
                          [--et] [--work DIR] [--json OUT.json]

Writes a random Hugging Face checkpoint with the model's real shapes (bf16 safetensors, tied
embeddings, written by ``transformers``; ``--layers`` keeps the first N layers) and a rank-16
PEFT adapter on all seven projections, then exports them with ``export_llama`` (8da4w g32
affine, float embedding: the recipe issue 17 measured,
``--max-seq-len 512``, last-position logits): the base program, the adapter program and the
shared ``foundation.ptd``. Each export runs in its own process under ``/usr/bin/time -v``, so
the peak RSS (``VmHWM``) is the export's alone. With ``--et``, ExecuTorch's own Llama example
exports the same weights and adapter (its LoRA program with a foundation file) the same way.

Rope scaling is left out of the configs (Llama 3.2's ``llama3`` scaling changes no shape and
no memory, and the example's rotary code needs its own model class for it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from edgelora.bench.common import SHAPES  # noqa: E402
from edgelora.bench.et_baseline import et_export_command, run_et_export, write_et_inputs  # noqa: E402

ADAPTER = "a0"
MAX_SEQ_LEN = 512
_STAGE = re.compile(
    r"^\[(?P<name>[^\]]+)\] (?P<s>[0-9.]+) s \(peak RSS (?P<mib>\d+) MiB, so far (?P<so_far>\d+) MiB\)$"
)
_ESTIMATE = re.compile(r"estimated peak memory (?P<gib>[0-9.]+) GiB")


def make_inputs(model: str, layers: int | None, out: Path, seed: int = 0) -> None:
    """The random HF checkpoint (``out/hf``) and PEFT adapter (``out/adapter``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    shape = dict(SHAPES[model])
    family = shape.pop("family")
    if layers:
        shape["num_hidden_layers"] = layers
    cls = LlamaConfig if family == "llama" else Qwen3Config
    cfg = cls(
        **shape, tie_word_embeddings=True, max_position_embeddings=MAX_SEQ_LEN,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:  # norms: not all ones, so a dropped one shows
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(out / "hf")
    lora = LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
    )  # fmt: skip
    peft = get_peft_model(hf, lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft.save_pretrained(out / "adapter")


def make_et_inputs(work: Path) -> None:
    """The example's inputs from the same checkpoint and adapter (Meta key names)."""
    from edgelora.models.args import ModelArgs
    from edgelora.weights.adapter_files import load_adapter
    from edgelora.weights.checkpoint import open_checkpoint

    ckpt = open_checkpoint(work / "hf")
    params = {**ckpt.params, "max_seq_len": MAX_SEQ_LEN}
    args = ModelArgs.from_dict(params)
    adapter = load_adapter(work / "adapter", args, name=ADAPTER)
    write_et_inputs(work / "et", params, ckpt.state_dict, adapter)


def _stages(output: str) -> tuple[dict, dict, float | None]:
    times, peaks, estimate = {}, {}, None
    for line in output.splitlines():
        m = _STAGE.match(line.strip())
        if m:
            times[m["name"]] = float(m["s"])
            peaks[m["name"]] = int(m["mib"])
        m = _ESTIMATE.search(line)
        if m:
            estimate = float(m["gib"])
    return times, peaks, estimate


def run_ours(work: Path, extra: list[str], out: Path | None = None) -> dict:
    out = out or work / "ours"
    cmd = [
        sys.executable, "-m", "edgelora.export.cli",  # PYTHONPATH may pick another checkout
        "--checkpoint", str(work / "hf"),
        "--lora", f"{ADAPTER}={work / 'adapter'}",
        "--qmode", "8da4w", "--group-size", "32", "--qparams", "affine", "--embedding-bits", "0",
        "--max-seq-len", str(MAX_SEQ_LEN), "--logits", "last",
        "--output-dir", str(out), "--overwrite", *extra,
    ]  # fmt: skip
    rec = run_et_export(cmd, out)
    rec["stages_s"], rec["stage_peak_rss_mib"], rec["estimate_gib"] = _stages(rec.pop("output"))
    rec["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return rec


def run_et(work: Path) -> dict:
    inputs = {k: work / "et" / v for k, v in (("params", "params.json"),
              ("checkpoint", "model.pth"))}  # fmt: skip
    adapter = work / "et" / "adapter"
    inputs.update(
        adapter_checkpoint=adapter / "adapter_model.safetensors",
        adapter_config=adapter / "adapter_config.json",
        lora_config=adapter / "lora_config.yaml",
    )
    out = work / "et" / "lora"
    cmd = et_export_command(
        inputs, out, name="lora", lora=True, foundation=True, max_seq_len=MAX_SEQ_LEN
    )
    rec = run_et_export(cmd, out)
    rec.pop("output")
    return rec


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--et", action="store_true", help="also run ExecuTorch's example")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (kept)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--flags", default="", help="extra export_llama flags (one string)")
    p.add_argument("--_make", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="edgelora-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if ns._make:  # child: keeps the generator's memory out of the parent
        make_inputs(ns.model, ns.layers, work)
        if ns.et:
            make_et_inputs(work)
        return
    if not (work / "hf" / "config.json").is_file() or (ns.et and not (work / "et").is_dir()):
        argv = [sys.executable, __file__, "--_make", "--model", ns.model, "--work", str(work)]
        argv += [*(["--layers", str(ns.layers)] if ns.layers else []), *(["--et"] if ns.et else [])]
        subprocess.run(argv, check=True)
    ckpt_bytes = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    print(f"checkpoint {work / 'hf'}: {_gib(ckpt_bytes)} of bf16 safetensors")
    result = {
        "model": ns.model,
        "layers": ns.layers or SHAPES[ns.model]["num_hidden_layers"],
        "checkpoint_bytes": ckpt_bytes,
        "target_peak_rss_mib": (1.5 * ckpt_bytes + 1.5 * 2**30) / 2**20,
        "ours": run_ours(work, ns.flags.split()),
    }
    ours = result["ours"]
    print(f"ours: {ours['wall_s']:.0f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(estimate {ours['estimate_gib']} GiB, target <= {result['target_peak_rss_mib']:.0f})")  # fmt: skip
    for name, s in ours["stages_s"].items():
        print(f"  {name:45s} {s:8.1f} s  peak {ours['stage_peak_rss_mib'][name]:6d} MiB")
    print("  files: " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in ours["files"].items()))
    if ns.et:
        et = result["et"] = run_et(work)
        print(f"ExecuTorch example (LoRA program + foundation): {et['wall_s']:.0f} s, peak RSS "
              f"{et['peak_rss_mib']:.0f} MiB; files " +
              ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in et["files"].items()))  # fmt: skip
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
