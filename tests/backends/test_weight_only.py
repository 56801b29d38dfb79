"""int8 adapter weights under fp32 activations (``backends/xnnpack/weight_only.py``): an int8
adapter (``quantize_adapter_weights``) on an fp32 layer lowers to one delegate and no portable
op, XNNPACK runs its two linears as F32-QC8W (int8 weights read as they are, no quantization
of the activations), and its output matches eager PyTorch's."""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from edgelora.lora.modules import LoRALinear
from edgelora.lora.record import LoRAWeights


def _int8_adapter_module() -> nn.Module:
    """An fp32 linear with a rank-8 int8 adapter: ``base(x) + s * b(a(x))``."""
    from edgelora.quant.linear import quantize_adapter_weights

    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False)
    weights = LoRAWeights(torch.randn(8, 64) * 0.1, torch.randn(96, 8) * 0.1, 16.0)
    model = nn.Sequential(LoRALinear.from_base(base, weights)).eval()
    quantize_adapter_weights(model)
    return model


def _xnnpack_ops(path, x) -> Counter:
    """XNNPACK's operators in one run of ``path`` (ETDump), by kind."""
    import tempfile
    from pathlib import Path

    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path, enable_etdump=True, debug_buffer_size=0)
    program.load_method("forward").execute([x])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        frame = Inspector(etdump_path=str(etdump)).to_dataframe()
    names = frame[frame.is_delegated_op].event_name
    return Counter(re.sub(r"\s*#\d+$", "", name) for name in names)


def test_int8_adapter_runs_as_f32_qc8w(tmp_path):
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.runtime import Runtime

    from edgelora.backends.xnnpack.lower import lower_to_xnnpack

    model = _int8_adapter_module()
    x = torch.randn(3, 64)
    ep = torch.export.export(model, (x,))
    lowered = lower_to_xnnpack(ep, is_adapter=lambda fqn: True)  # every constant inline
    data = lowered.manager.buffer
    plan = deserialize_pte_binary(data).program.execution_plan[0]
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions]
    assert not [c for c in calls if hasattr(c, "op_index")] and len(plan.delegates) == 1

    path = tmp_path / "int8.pte"
    path.write_bytes(data)

    ops = _xnnpack_ops(path, x)
    f32_qc8w = sum(n for kind, n in ops.items() if "F32, QC8W" in kind)
    assert f32_qc8w == 2, ops  # lora_A and lora_B
    assert not [kind for kind in ops if "QD8" in kind or "Convert" in kind], ops

    got = Runtime.get().load_program(path).load_method("forward").execute([x])[0]
    with torch.no_grad():
        want = model(x)
    # The same int8 weights and fp32 arithmetic in another summation order: fp32 rounding.
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
