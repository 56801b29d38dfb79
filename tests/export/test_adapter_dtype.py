"""``--adapter-dtype int8`` for adapter programs: ``lora_A``/``lora_B`` as int8 per output
channel with int8 dynamic activations (XNNPACK's QC8W linear). The program matches its eager
model (the same int8 adapter) within the output-match tolerances, its adapter costs about one
byte per parameter, the int8 adapter keeps the fp32 adapter's effect, and ``--add-to`` writes
later adapter programs in the export's adapter dtype."""

from __future__ import annotations

import json

import torch

from edgelora.ci.output_match import eager_reference, match_export
from edgelora.export import cli
from edgelora.format.manifest import read_export
from edgelora.lora.attach import adapter_attached
from edgelora.models.args import ModelArgs
from edgelora.runtime.program import LlamaProgram
from edgelora.weights.adapter_files import load_adapter

TOKENS = [1, 5, 9, 33, 2, 7, 11, 40, 3]


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

    # The runtime against the eager model with the same int8 adapter: the output-match checks.
    for match in match_export(out):
        assert not match.failures(), (match.name, match.failures())

    # Against the fp32 adapter: int8 per-channel weights (error <= 1/254 of each channel's
    # largest value) and the adapter path's int8 activations move the logits by a small
    # fraction of what the adapter changes (measured: 0.0030 against 0.060, 5% of it).
    exp = read_export(out)
    model = eager_reference(exp)
    adapter = load_adapter(adapter_dirs["chat"], ModelArgs.from_dict(exp.model), "chat")
    with torch.no_grad():
        model.reset_cache()
        base = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
        with adapter_attached(model, adapter):
            model.reset_cache()
            fp32 = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
    got = LlamaProgram(out / "chat.pte", out / "foundation.ptd").forward(TOKENS, 0)
    effect = (fp32 - base).abs().max().item()
    err = (got - fp32).abs().max().item()
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
    # rounding 2^-11 per value) move the logits by a tiny fraction of the adapter's effect.
    exp = read_export(out)
    model = eager_reference(exp)
    adapter = load_adapter(adapter_dirs["chat"], ModelArgs.from_dict(exp.model), "chat")
    with torch.no_grad():
        model.reset_cache()
        base = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
        with adapter_attached(model, adapter):
            model.reset_cache()
            fp32 = model(torch.tensor([TOKENS]), torch.tensor([0]))[0]
    got = LlamaProgram(out / "chat.pte", out / "foundation.ptd").forward(TOKENS, 0)
    effect = (fp32 - base).abs().max().item()
    err = (got - fp32).abs().max().item()
    assert err < 0.1 * effect, (err, effect)
