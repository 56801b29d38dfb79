"""fp32 <-> fp16 conversions inside the XNNPACK delegate.

An adapter stored in fp16 under an fp32 model (``--adapter-dtype fp16``) runs as
``x -> fp16 -> lora_A -> lora_B -> fp32``. ExecuTorch 1.5.1's XNNPACK partitioner delegates the
fp16 linears but refuses every dtype-changing ``_to_dim_order_copy`` (its
``ToDimOrderCopyConfig`` takes layout changes only), so each adapted projection would leave the
delegate twice and run its conversions as portable ops. XNNPACK itself converts between fp32
and fp16 (``xnn_define_convert``, which ExecuTorch's runtime builds for an ``XNNConvert`` node):

- :class:`HalfConversionConfig` partitions a conversion between fp32 and fp16 (and, like the
  stock config, a layout-only copy);
- the serializer's visitor for ``aten._to_copy`` (the partition's passes turn
  ``_to_dim_order_copy`` back into it) writes such a conversion as an ``XNNConvert`` node and
  hands every other copy to the stock visitor.

Other dtype changes (bf16, integers) stay refused, as before.
"""

from __future__ import annotations

import torch

_HALF = frozenset({torch.float32, torch.float16})
_TO_COPY = "aten._to_copy.default"


def _is_half_conversion(node: torch.fx.Node) -> bool:
    from executorch.backends.xnnpack.utils.utils import get_input_node

    src, dst = get_input_node(node, 0).meta["val"].dtype, node.meta["val"].dtype
    return src != dst and {src, dst} == _HALF


def replace_copy_config(configs: list[type]) -> list[type]:
    """``configs`` with the ``_to_dim_order_copy`` one replaced by ``HalfConversionConfig``,
    whose serializer's visitor this registers (``configs`` as they are if there is no visitor
    to extend)."""
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        ToDimOrderCopyConfig,
    )

    class HalfConversionConfig(ToDimOrderCopyConfig):
        """``_to_dim_order_copy``: a layout change (as the stock config) or an fp32 <-> fp16
        conversion that keeps the default layout."""

        def check_constraints(self, node, ep) -> bool:
            if not _is_half_conversion(node):
                return super().check_constraints(node, ep)
            dims = node.kwargs.get("dim_order")
            contiguous = dims is None or list(dims) == list(range(node.meta["val"].dim()))
            return contiguous and self.check_common_constraints(node, ep)

    if not _register_visitor():
        return list(configs)
    return [HalfConversionConfig if c is ToDimOrderCopyConfig else c for c in configs]


def _register_visitor() -> bool:
    """Register :class:`HalfConversionVisitor` over the stock ``_to_copy`` visitor (once);
    ``False`` if this ExecuTorch has no such visitor to extend."""
    from executorch.backends.xnnpack.operators import node_visitor
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConvert, XNode
    from executorch.backends.xnnpack.utils.utils import get_input_node

    stock = node_visitor._node_visitor_dict.get(_TO_COPY)
    if stock is None:
        return False
    if getattr(stock, "converts_half", False):
        return True

    class HalfConversionVisitor(stock):
        """``_to_copy`` between fp32 and fp16 as ``XNNConvert``; any other copy as before."""

        converts_half = True

        def define_node(self, node, xnn_graph, vals_to_ids, debug_handle) -> None:
            if not _is_half_conversion(node):
                return super().define_node(node, xnn_graph, vals_to_ids, debug_handle)
            src = get_input_node(node, 0)
            self.define_tensor(src, xnn_graph, vals_to_ids)
            self.define_tensor(node, xnn_graph, vals_to_ids)
            convert = XNNConvert(input_id=vals_to_ids[src], output_id=vals_to_ids[node], flags=0)
            xnn_graph.xnodes.append(XNode(xnode_union=convert, debug_handle=debug_handle))

    node_visitor.register_node_visitor(HalfConversionVisitor)
    return True
