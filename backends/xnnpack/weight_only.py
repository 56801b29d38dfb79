"""int8 weights under fp32 activations inside the XNNPACK delegate (XNNPACK's F32-QC8W linear).

An int8 adapter (``--adapter-dtype int8``) stores each ``lora_A``/``lora_B`` weight as int8 with
one scale per output channel. XNNPACK multiplies fp32 activations by such weights directly
(``Fully Connected (NC, F32, QC8W)``: the kernel widens the int8 weights as it reads them), so
the adapter costs a quarter of its fp32 bytes per token and needs no quantization of its
activations. ExecuTorch 1.5.1's XNNPACK partitioner knows only fp32, statically quantized and
dynamically quantized linears: a linear whose weight is dequantized but whose activation is not
is none of them. Its serializer already writes such a linear as wanted (an fp32 input, a
per-channel quantized filter): :class:`WeightOnlyLinearConfig` claims the linear with its
weight's dequantize node, its int8 weight and scales, and hands every other linear to the stock
config -- except a weight-only linear it cannot take (one with a bias), which stays out of the
delegate rather than reach the stock config as an fp32 linear.

On the small linears of an adapter this matters twice: dynamically quantized activations add a
quantize op per linear (XNNPACK's per-op cost is most of a rank-16 linear's time), and an
adapter's bytes are what it adds per token.
"""

from __future__ import annotations

import torch


def _weight_only(node: torch.fx.Node, ep) -> list[torch.fx.Node] | None:
    """The nodes a weight-only int8 linear takes with it (its weight's dequantize node, the
    int8 weight and its per-channel scales and zero points), or ``None`` if ``node`` is not
    one: an fp32 activation that is not dequantized, a weight dequantized per output channel
    from a static int8 parameter with zero points of 0 (XNNPACK's QC8W is symmetric)."""
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_per_channel
    from executorch.backends.xnnpack.utils.utils import (
        get_input_node,
        get_param_tensor,
        is_param_node,
    )
    from torch._subclasses.fake_tensor import FakeTensor

    act, dq = get_input_node(node, 0), get_input_node(node, 1)
    if is_dequant(act) or not is_dequant(dq) or not is_per_channel(dq):
        return None
    if act.meta["val"].dtype != torch.float32:
        return None
    if len(node.args) > 2 and node.args[2] is not None:
        # ExecuTorch 1.5.1's serializer refuses a bias beside a quantized weight and an fp32
        # input ("Weight and Input should both be quantized"); quant/linear.py stores biased
        # linears as 8da8w instead
        return None
    weight, *qparams = dq.all_input_nodes[:3]
    if not is_param_node(ep, weight) or weight.meta["val"].dtype != torch.int8:
        return None
    if len(qparams) != 2 or not all(is_param_node(ep, p) for p in qparams):
        return None
    zero_point = get_param_tensor(ep, qparams[1])
    # ExecuTorch also asks with fake parameters (which ops to keep whole): no values to read
    # then; the partition itself sees the real ones.
    if zero_point is None or not isinstance(zero_point, FakeTensor) and bool(zero_point.any()):
        return None
    return [dq, weight, *qparams]


def _dequantized_float_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a linear of fp32 activations and a dequantized weight -- one the
    stock config would take as an fp32 linear and miscompute (measured: a weight-only int8
    linear with a bias, which the check above refuses, came out as noise)."""
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.backends.xnnpack.utils.utils import get_input_node

    act, dq = get_input_node(node, 0), get_input_node(node, 1)
    return not is_dequant(act) and is_dequant(dq)


def replace_linear_config(configs: list[type]) -> list[type]:
    """``configs`` with the stock ``LinearConfig`` replaced by :class:`WeightOnlyLinearConfig`,
    which takes every linear the stock one takes, and weight-only int8 linears."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.utils.quant_utils import tag_as_implicit_q_dq

    class WeightOnlyLinearConfig(LinearConfig):
        """``aten.linear`` as the stock config, or with int8 weights under fp32 activations."""

        def get_deps(self, node, ep):
            deps = _weight_only(node, ep)
            if deps is None:
                if _dequantized_float_linear(node):
                    return False, []  # stays out of the delegate: portable kernels, exact
                return super().get_deps(node, ep)
            tag_as_implicit_q_dq(deps[0])
            return True, deps

    return [WeightOnlyLinearConfig if c is LinearConfig else c for c in configs]
