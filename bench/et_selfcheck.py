"""Self-check of ``bench/et_baseline.py`` on a tiny model: export a base and a LoRA program with
ExecuTorch's example, run both on the runtime and compare their logits with our eager model (and
with the example's own eager model in fp32, which isolates layout errors from quantization
error).

    python bench/et_selfcheck.py [--work DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edgelora.bench.et_baseline import TINY, et_export_command, run_et_export, write_et_inputs  # noqa: E402
from edgelora.lora.attach import adapter_attached
from edgelora.models.args import ModelArgs
from edgelora.models.llama import build_model
from edgelora.weights.synthetic import random_adapter


def _runtime_logits(pte: Path, ptd: Path | None, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits ``[vocab]`` of ``pte``'s ``forward(tokens, input_pos=[0])``."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte, data_path=ptd)
    (logits,) = program.load_method("forward").execute([tokens, torch.tensor([0])])
    return logits.reshape(-1)


def _et_eager_logits(
    inputs: dict[str, Path], lora: bool, tokens: torch.Tensor, max_seq_len: int
) -> torch.Tensor:
    """Last-position logits of the example's own eager model (fp32, unquantized) loaded from
    ``inputs``: checks the checkpoint and adapter layout independently of quantization."""
    from executorch.examples.models.llama.model import Llama2Model
    from executorch.extension.llm.export.config.llm_config import LlmConfig, LoraConfig

    cfg = LlmConfig()
    cfg.base.checkpoint, cfg.base.params = str(inputs["checkpoint"]), str(inputs["params"])
    if lora:
        cfg.base.lora_config = LoraConfig(
            adapter_checkpoint=str(inputs["adapter_checkpoint"]),
            adapter_config=str(inputs["adapter_config"]),
        )
    cfg.model.use_kv_cache = True
    cfg.export.max_seq_length = cfg.export.max_context_length = max_seq_len
    model = Llama2Model(cfg).get_eager_model().eval()
    with torch.no_grad():
        out = model(tokens, {"input_pos": torch.tensor([0])})
    return (out[0] if isinstance(out, tuple) else out).reshape(-1)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/etb/selfcheck"))
    work = p.parse_args().work.resolve()

    args = ModelArgs.from_dict(TINY)
    model = build_model(args)
    adapter = random_adapter(model, "a0", rank=4, alpha=8, seed=10)
    inputs = write_et_inputs(work / "inputs", TINY, model, adapter)
    tokens = torch.tensor([[1, 2, 3]])

    programs = {}
    for name, lora in (("base", False), ("lora", True)):
        out_dir = work / name
        cmd = et_export_command(
            inputs, out_dir, name=name, lora=lora, foundation=True, max_seq_len=args.max_seq_len
        )
        print(f"$ {' '.join(cmd)}")
        result = run_et_export(cmd, out_dir)
        print(
            f"{name}: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
            f"files {result['files']}"
        )
        programs[name] = (out_dir / f"{name}.pte", out_dir / f"{name}_foundation.ptd")

    refs, got = {}, {}
    for name, (pte, ptd) in programs.items():
        with torch.no_grad(), adapter_attached(model, adapter if name == "lora" else None):
            refs[name] = model(tokens, torch.tensor([0]))[0, -1]
        et_eager = _et_eager_logits(inputs, name == "lora", tokens, args.max_seq_len)
        got[name] = _runtime_logits(pte, ptd, tokens)
        print(
            f"{name}: max|logit| {refs[name].abs().max():.4f}; max abs diff vs our eager fp32: "
            f"ExecuTorch runtime 8da4w {(got[name] - refs[name]).abs().max():.3e}, "
            f"example's eager fp32 {(et_eager - refs[name]).abs().max():.3e}"
        )
    # The adapter's contribution (lora - base logits): the base's quantization error mostly
    # cancels, so this checks the adapter itself more tightly than the logits do.
    effect = refs["lora"] - refs["base"]
    effect_diff = (got["lora"] - got["base"] - effect).abs().max()
    print(
        f"adapter effect: max {effect.abs().max():.3e} in eager, max abs diff in the runtime "
        f"{effect_diff:.3e}"
    )
    # One foundation file for both programs? (Named-data keys are content hashes.)
    same = programs["lora"][1].read_bytes() == programs["base"][1].read_bytes()
    cross = _runtime_logits(programs["lora"][0], programs["base"][1], tokens)
    print(
        f"foundation files identical: {same}; lora.pte with base_foundation.ptd: max abs diff "
        f"vs its own {(cross - got['lora']).abs().max():.3e}"
    )


if __name__ == "__main__":
    main()
