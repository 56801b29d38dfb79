"""``--adapter-dtype int8|fp16`` for adapter programs: ``lora_A``/``lora_B`` as int8 weights under
fp32 activations (XNNPACK's F32-QC8W linear), or fp16 between two delegated conversions. Each
program matches its eager model (the same int8 or fp16 adapter) within the output-match
tolerances, its adapter costs about one (two) bytes per parameter, it keeps the fp32 adapter's
effect, and ``--add-to`` writes later adapter programs in the export's adapter dtype."""

from __future__ import annotations

import json

import torch

from edgelora.ci.output_match import eager_reference, match_export
from edgelora.export import cli
from edgelora.format.manifest import read_export
from edgelora.format.pte import read_pte
from edgelora.lora.attach import adapter_attached
from edgelora.models.args import ModelArgs
from edgelora.runtime.program import LlamaProgram
from edgelora.weights.adapter_files import load_adapter

TOKENS = [1, 5, 9, 33, 2, 7, 11, 40, 3]


def _error_against_fp32(out, adapter) -> tuple[float, float]:
    """Max |logit| difference of ``out``'s ``chat.pte`` from the eager model with the fp32
    ``adapter``, and the adapter's own effect on the eager logits."""
    model = eager_reference(read_export(out))
    with torch.no_grad():
        model.reset_cache()
        base = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
        with adapter_attached(model, adapter):
            model.reset_cache()
            fp32 = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
    got = LlamaProgram(out / "chat.pte", out / "foundation.ptd").forward(TOKENS, 0)
    return (got - fp32).abs().max().item(), (fp32 - base).abs().max().item()


def test_int8_adapter_programs(tmp_path, params_file, adapter_dirs):
    out = tmp_path / "out"
    argv = ["--params", params_file, f"--lora=chat={adapter_dirs['chat']}", "--adapter-dtype"]
    argv += ["int8", "--output-dir", out]
    assert cli.main([str(a) for a in argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    programs = manifest["programs"]
    assert programs["chat"]["adapter_dtype"] == "int8" and programs["base"]["adapter_dtype"] == ""

    # About one byte per adapter parameter (+ the program's graph and the channels' scales).
    parameters = programs["chat"]["adapter"]["bytes_fp32"] // 4
    extra = (out / "chat.pte").stat().st_size - (out / "base.pte").stat().st_size
    assert extra <= parameters + 64 * 1024, (extra, parameters)

    # The scales: one per rank component of each lora_A, and lora_B's (one shared value on
    # every channel) stored once per output size -- not one fp32 per output channel of each
    # projection (XNNPACK keys a constant by its bytes).
    adapter = load_adapter(adapter_dirs["chat"], ModelArgs.from_dict(manifest["model"]), "chat")
    weights = adapter.modules.values()
    scales = {k: n for k, n in read_pte(out / "chat.pte").inline.items() if k.startswith("scale_")}
    out_sizes = {w.lora_b.shape[0] for w in weights}
    assert len(scales) == len(weights) + len(out_sizes), sorted(scales.values())
    assert sum(scales.values()) == 4 * (sum(w.rank for w in weights) + sum(out_sizes))

    # The int8 linears run inside the delegate: the same portable ops as the base program.
    base_ops = _portable_ops(out / "base.pte")
    assert base_ops and _portable_ops(out / "chat.pte") == base_ops

    # The runtime against the eager model with the same int8 adapter: the output-match checks.
    for match in match_export(out):
        assert not match.failures(), (match.name, match.failures())

    # Against the fp32 adapter: int8 weights (lora_B per rank column, lora_A per row: error
    # <= half a step, 1/254 of the slice's largest value) move the logits by a small fraction
    # of what the adapter changes (measured: 0.0031 against 0.060, 5% of it, most of it the
    # 8da4w base's activation rounding; 0.0030 with int8 activations on the adapter path).
    err, effect = _error_against_fp32(out, adapter)
    assert err < 0.1 * effect, (err, effect)

    # A later adapter program keeps the export's adapter dtype.
    assert cli.main([str(a) for a in ["--add-to", out, f"--lora=code={adapter_dirs['code']}",
                                      "--params", params_file]]) == 0  # fmt: skip
    assert read_export(out).programs["code"].adapter_dtype == "int8"


def _portable_ops(path) -> list[str]:
    """The operators a program runs outside its delegates, with repeats (one per call)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes()).program
    plan = program.execution_plan[0]
    names = [op.name for op in plan.operators]
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions]
    return sorted(names[c.op_index] for c in calls if hasattr(c, "op_index"))


def test_fp16_adapter_programs(tmp_path, params_file, adapter_dirs):
    out = tmp_path / "out"
    argv = ["--params", params_file, f"--lora=chat={adapter_dirs['chat']}", "--adapter-dtype"]
    argv += ["fp16", "--output-dir", out]
    assert cli.main([str(a) for a in argv]) == 0
    programs = json.loads((out / "manifest.json").read_text())["programs"]
    assert programs["chat"]["adapter_dtype"] == "fp16" and programs["base"]["adapter_dtype"] == ""

    # Two bytes per adapter parameter (+ the program's graph).
    parameters = programs["chat"]["adapter"]["bytes_fp32"] // 4
    extra = (out / "chat.pte").stat().st_size - (out / "base.pte").stat().st_size
    assert 2 * parameters <= extra <= 2 * parameters + 64 * 1024, (extra, parameters)

    # The fp32 <-> fp16 conversions run inside the delegate: the adapter program runs the
    # same portable ops as the base program (none of them a conversion).
    base_ops = _portable_ops(out / "base.pte")
    assert base_ops and _portable_ops(out / "chat.pte") == base_ops

    # The runtime against the eager model with the same fp16 adapter: the output-match checks.
    for match in match_export(out):
        assert not match.failures(), (match.name, match.failures())

    # Against the fp32 adapter: fp16 weights and activations on the adapter path (relative
    # rounding 2^-11 per value) move the logits by a tiny fraction of the adapter's effect
    # (measured: 0.0012 against 0.060, most of it the 8da4w base's activation rounding).
    adapter = load_adapter(
        adapter_dirs["chat"], ModelArgs.from_dict(read_export(out).model), "chat"
    )
    err, effect = _error_against_fp32(out, adapter)
    assert err < 0.1 * effect, (err, effect)
