"""Baseline programs exported by ExecuTorch's own Llama example (``export_llama``).

    (a library of bench/run.py; its self-check: python bench/et_selfcheck.py [--work DIR])

Our exports are compared against what a user gets from the example shipped in the ``executorch``
wheel (``executorch/examples/models/llama``): 8da4w weights (group 32) delegated to XNNPACK,
a KV cache with the custom SDPA op, dynamic prefill length, fp32 activations and, for a LoRA
program, the adapter plus the base weights in a separate foundation ``.ptd`` file.

The example is driven through its Hydra front end (``export_llama --hydra key=value ...``):
``export.foundation_weights_file`` exists only in its ``LlmConfig``, the legacy argparse flags
(``-qmode 8da4w -G 32 -X -kv --use_sdpa_with_kv_cache``) have no option for it. The adapter
goes in a small config file (``--config``): Hydra cannot set ``base.lora_config`` fields from the
command line.

Input formats the example reads (see :func:`write_et_inputs`):

* ``params.json`` with Meta's keys but without ``max_seq_len`` (the example passes
  ``export.max_seq_length`` itself, so the key would be an argument given twice);
* a ``.pth`` state dict in Meta key names, which our ``Transformer`` already uses (Meta's
  adjacent-pair rotary layout for ``wq``/``wk``, as the example's ``apply_rotary_emb``);
* an adapter as ``adapter_model.safetensors`` + ``adapter_config.json``. The example maps the
  safetensors' PEFT key names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)
  straight onto its modules without the HF-to-Meta rotary row permutation PEFT adapters need, so
  ``lora_B`` is written in Meta row order here (unlike our PEFT writer). Its other format,
  torchtune's ``adapter_model.pt``, needs ``torchtune`` installed for the key renaming.

``bench/et_selfcheck.py`` checks it on a tiny model: a base and a LoRA program exported by the
example, run on the runtime and compared with our eager model.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from edgelora.lora.record import Adapter
from edgelora.models.args import ModelArgs
from edgelora.weights.families.base import LLAMA_PROJECTIONS

ET_EXPORT_MODULE = "executorch.examples.models.llama.export_llama"
TIME_BIN = Path("/usr/bin/time")
# Our layer-relative projection path -> the HF name the example's LoRA config and keys use.
_HF_NAME = {ours: proj for proj, (_, ours) in LLAMA_PROJECTIONS.items()}
_PEFT_KEY = "base_model.model.model.layers.{layer}.{parent}.{proj}.lora_{half}.weight"
TINY = {
    "dim": 64,
    "n_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 32,
    "max_seq_len": 64,
}


def _et_params(args: ModelArgs) -> dict[str, Any]:
    """``args`` as the example's ``params.json`` (its ``ModelArgs`` keyword names)."""
    unsupported = [
        name
        for name in ("attention_bias", "mlp_bias", "sandwich_norms", "nope_layers", "layer_types")
        if getattr(args, name)
    ]
    if args.is_mla or args.use_scaled_rope or unsupported:
        raise ValueError(
            "et_baseline: only Llama/Qwen3-style models (GQA, unscaled rope, optional q/k norm) "
            f"are supported, got attention_type={args.attention_type!r}, use_scaled_rope="
            f"{args.use_scaled_rope}, {unsupported}"
        )
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }
    if args.hidden_dim is not None:
        params["hidden_dim"] = args.hidden_dim
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.head_dim_override is not None:
        params["head_dim"] = args.head_dim_override
    if args.qk_norm:  # Qwen3: per-head RMSNorm on q and k before rotary
        params.update(use_qk_norm=True, qk_norm_before_rope=True)
    return params


def _et_state_dict(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s weights (or a state dict in our names) under the example's names (its q/k
    norms are ``q_norm_fn``)."""
    sd = {}
    for k, v in (model if isinstance(model, dict) else model.state_dict()).items():
        sd[
            k.replace(".attention.q_norm.", ".attention.q_norm_fn.").replace(
                ".attention.k_norm.", ".attention.k_norm_fn."
            )
        ] = v.detach().contiguous()
    return sd


def _check_weight_names(
    model: nn.Module | dict, et_params: dict[str, Any], max_seq_len: int
) -> None:
    """Raise unless ``model``'s state dict has exactly the weights the example's Transformer
    loads (it loads non-strictly: a missing weight fails, an extra key is silently dropped)."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs as EtModelArgs

    et_args = EtModelArgs(max_seq_len=max_seq_len, max_context_len=max_seq_len, **et_params)
    with torch.device("meta"):
        expected = {k for k in construct_transformer(et_args).state_dict() if k.endswith(".weight")}
    ours = set(_et_state_dict(model))
    if ours != expected:
        raise ValueError(
            "et_baseline: model weights do not match the example's Transformer: missing "
            f"{sorted(expected - ours)[:5]}, unexpected {sorted(ours - expected)[:5]} "
            "(a fused wqkv/w13 model must be unfused first)"
        )


def _write_adapter(adapter: Adapter, n_layers: int, out: Path) -> dict[str, Path]:
    """Write ``adapter`` the way the example's ``.safetensors`` LoRA path reads it, plus the
    Hydra config file naming it (``adapter_checkpoint``, ``adapter_config``, ``lora_config``).

    The example builds every targeted projection in every layer with one rank and one alpha
    (``scale = alpha / rank``). Ranks must agree; any per-module alpha, rsLoRA or user scale
    differing from the first module's is folded into ``lora_B`` (exact: the factor is 1.0 for a
    uniform plain adapter).
    """
    from safetensors.torch import save_file

    by_layer: dict[int, set[str]] = {}
    for fqn in adapter.modules:
        _, layer, path = fqn.split(".", 2)
        by_layer.setdefault(int(layer), set()).add(path)
    paths = by_layer.get(0, set())
    if set(by_layer) != set(range(n_layers)) or any(p != paths for p in by_layer.values()):
        raise ValueError(
            f"adapter {adapter.name!r}: the example adapts the same projections in every layer; "
            "this adapter does not"
        )
    unsupported = sorted(paths - set(_HF_NAME))
    if unsupported:
        raise ValueError(f"adapter {adapter.name!r}: projections {unsupported} are not Llama's")
    ranks = {w.rank for w in adapter.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter {adapter.name!r}: the example needs one rank, got {ranks}")
    (rank,) = ranks
    alpha = next(iter(adapter.modules.values())).alpha
    tensors = {}
    for fqn, w in adapter.modules.items():
        _, layer, path = fqn.split(".", 2)
        proj = _HF_NAME[path]
        scale = adapter.scale * w.alpha / (math.sqrt(rank) if w.use_rslora else rank)
        key = {"layer": layer, "parent": LLAMA_PROJECTIONS[proj][0], "proj": proj}
        tensors[_PEFT_KEY.format(half="A", **key)] = w.lora_a.float().contiguous()
        b = w.lora_b.float() * (scale / (alpha / rank))
        tensors[_PEFT_KEY.format(half="B", **key)] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    weights, config = out / "adapter_model.safetensors", out / "adapter_config.json"
    save_file(tensors, str(weights))
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(_HF_NAME[p] for p in paths),
    }
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    # Hydra cannot set fields under base.lora_config (None by default) from the command line,
    # but a config file extending the example's schema can.
    lora_config = out / "lora_config.yaml"
    lora = {"adapter_checkpoint": str(weights.resolve()), "adapter_config": str(config.resolve())}
    lora_config.write_text(
        yaml.safe_dump({"defaults": ["llm_config", "_self_"], "base": {"lora_config": lora}})
    )
    return {"adapter_checkpoint": weights, "adapter_config": config, "lora_config": lora_config}


def write_et_inputs(
    work: Path,
    params: dict[str, Any],
    model: nn.Module | dict[str, torch.Tensor],
    adapter: Adapter | None = None,
) -> dict[str, Path]:
    """Write the example's inputs for ``model`` (built from ``params``; or its state dict in our
    key names, e.g. a checkpoint's, in its own dtype) into ``work``.

    Returns the paths by role: ``params`` (``params.json``), ``checkpoint`` (``model.pth``) and,
    with ``adapter``, ``adapter_checkpoint``, ``adapter_config`` and ``lora_config`` (the Hydra
    config file passing both to the example), under ``work/adapter``.
    Raises ``ValueError`` for a model or adapter the example cannot express.
    """
    args = ModelArgs.from_dict(params)
    et_params = _et_params(args)
    _check_weight_names(model, et_params, args.max_seq_len)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"params": work / "params.json", "checkpoint": work / "model.pth"}
    paths["params"].write_text(json.dumps(et_params, indent=2) + "\n")
    torch.save(_et_state_dict(model), paths["checkpoint"])
    if adapter is not None:
        paths.update(_write_adapter(adapter, args.n_layers, work / "adapter"))
    return paths


def _hydra_str(value: Path | str) -> str:
    """A Hydra override value quoted as a string (paths may hold Hydra's special characters)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def et_export_command(
    inputs: dict[str, Path],
    out_dir: Path,
    *,
    name: str,
    lora: bool,
    foundation: bool,
    group_size: int = 32,
    max_seq_len: int = 128,
) -> list[str]:
    """The example's command line writing ``out_dir/<name>.pte`` (and, with ``foundation``,
    ``out_dir/<name>_foundation.ptd`` holding every non-LoRA weight).

    8da4w with ``group_size`` (HQQ scales, the example's default), XNNPACK, KV cache with the
    custom SDPA op, dynamic prefill length (up to ``max_seq_len - 1`` tokens), a KV cache of
    ``max_seq_len`` positions, fp32. ``lora`` adds ``inputs``' adapter through ``--config
    lora_config.yaml`` (its LoRA weights stay in the ``.pte``). Run it with ``cwd=out_dir``.
    """
    out_dir = Path(out_dir).resolve()
    cmd = [
        sys.executable,
        "-m",
        ET_EXPORT_MODULE,
        "--hydra",
        *(["--config", str(inputs["lora_config"].resolve())] if lora else []),
        "base.model_class=llama3",  # any example-defined Llama: no rope scaling in params
        f"base.checkpoint={_hydra_str(inputs['checkpoint'].resolve())}",
        f"base.params={_hydra_str(inputs['params'].resolve())}",
        "model.dtype_override=fp32",
        "model.use_kv_cache=true",
        "model.use_sdpa_with_kv_cache=true",
        "model.enable_dynamic_shape=true",
        "backend.xnnpack.enabled=true",
        "quantization.qmode=8da4w",
        f"quantization.group_size={group_size}",
        f"export.max_seq_length={max_seq_len}",
        f"export.max_context_length={max_seq_len}",
        f"export.output_dir={_hydra_str(out_dir)}",
        f"export.output_name={_hydra_str(name)}",  # no .pte suffix: that bypasses output_dir
    ]
    if foundation:
        cmd.append(f"export.foundation_weights_file={_hydra_str(name + '_foundation.ptd')}")
    # Hydra: run in out_dir, write no .hydra/ or log file there (logs go to stderr).
    cmd += [f"hydra.run.dir={_hydra_str(out_dir)}", "hydra.output_subdir=null"]
    return cmd + ["hydra/job_logging=none"]


def _poll_peak_rss(proc: subprocess.Popen) -> float:
    """Peak RSS (MiB) of ``proc`` and its descendants, sampled every 50 ms until it exits."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:  # a process exited while sampling
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    return peak / 2**20


def run_et_export(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run an export command in ``cwd``; return ``wall_s``, ``peak_rss_mib`` (of the child
    process tree: ``/usr/bin/time -v`` if present, else psutil polling), ``files`` (name ->
    bytes of the files in ``cwd`` the run wrote) and ``output`` (its stdout and stderr).

    Raises ``RuntimeError`` with the last 3000 characters of the child's output (stderr, with
    stdout interleaved) if the command fails or writes no ``.pte`` (the example only logs a
    failed save and still exits 0).
    """
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    timed = TIME_BIN.exists()
    with tempfile.TemporaryDirectory() as tmp:
        log, usage = Path(tmp, "output.txt"), Path(tmp, "time.txt")
        full = [str(TIME_BIN), "-v", "-o", str(usage), *cmd] if timed else cmd
        start_ns, t0 = time.time_ns(), time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(full, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
            peak = math.nan if timed else _poll_peak_rss(proc)
            proc.wait()
        wall = time.perf_counter() - t0
        text = log.read_text(errors="replace")
        if timed and usage.is_file():
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", usage.read_text())
            peak = int(m.group(1)) / 1024 if m else peak
    files = {
        f.name: f.stat().st_size
        for f in sorted(cwd.iterdir())
        if f.is_file() and f.stat().st_mtime_ns >= start_ns
    }
    if proc.returncode != 0 or not any(n.endswith(".pte") for n in files):
        raise RuntimeError(
            f"ExecuTorch export failed (exit {proc.returncode}, wrote {sorted(files)}): "
            f"{' '.join(cmd)}\n...{text[-3000:]}"
        )
    return {"wall_s": wall, "peak_rss_mib": peak, "files": files, "output": text}
