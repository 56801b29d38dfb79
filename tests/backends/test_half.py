"""fp32 <-> fp16 conversions inside the XNNPACK delegate (``backends/xnnpack/half.py``): with
``half_conversions`` a module that runs an fp16 linear between two conversions lowers to one
delegate and no portable op, and its output on the runtime matches eager PyTorch's; without
it the conversions stay outside (ExecuTorch 1.5.1's stock partitioner)."""

from __future__ import annotations

import torch
from torch import nn


class _HalfBranch(nn.Module):
    """``base(x) + b(a(x in fp16)) in fp32``: the shape of an fp16 adapter on an fp32 layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(64, 96, bias=False)
        self.a = nn.Linear(64, 8, bias=False).half()
        self.b = nn.Linear(8, 96, bias=False).half()
        nn.init.normal_(self.b.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x.half())).float()


def _lower(half: bool):
    from executorch.exir._serialize._program import deserialize_pte_binary

    from edgelora.backends.xnnpack.lower import lower_to_xnnpack

    model = _HalfBranch().eval()
    x = torch.randn(3, 64)
    ep = torch.export.export(model, (x,))
    lowered = lower_to_xnnpack(ep, is_adapter=lambda fqn: True, half_conversions=half)
    data = lowered.manager.buffer
    plan = deserialize_pte_binary(data).program.execution_plan[0]
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions]
    ops = sorted(plan.operators[c.op_index].name for c in calls if hasattr(c, "op_index"))
    return model, x, data, ops, len(plan.delegates)


def test_half_conversions_run_in_the_delegate(tmp_path):
    from executorch.runtime import Runtime

    model, x, data, ops, delegates = _lower(half=True)
    assert ops == [] and delegates == 1, (ops, delegates)
    path = tmp_path / "half.pte"
    path.write_bytes(data)
    got = Runtime.get().load_program(path).load_method("forward").execute([x])[0]
    with torch.no_grad():
        want = model(x)
    # fp16 rounding on the branch (eps 9.8e-4 relative, summed over 64 then 8 products) in
    # each engine's own order: well under 1e-2 of the output's range.
    assert (got - want).abs().max().item() < 1e-2 * want.abs().max().item()


def test_without_half_conversions_they_stay_outside():
    _, _, _, ops, _ = _lower(half=False)
    assert ops.count("dim_order_ops::_to_dim_order_copy") == 2, ops
