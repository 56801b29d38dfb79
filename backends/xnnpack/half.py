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
  hands every other copy to the stock visitor: a patch, so it lives in
  :mod:`edgelora.backends.xnnpack.patches` (``half_conversion_visitor``), active only while such
  a program lowers.

Other dtype changes (bf16, integers) stay refused, as before.
"""

from __future__ import annotations

from edgelora.backends.xnnpack.patches import can_convert_half, is_half_conversion


def replace_copy_config(configs: list[type]) -> list[type]:
    """``configs`` with the ``_to_dim_order_copy`` one replaced by ``HalfConversionConfig``
    (``configs`` as they are if this ExecuTorch has no ``_to_copy`` visitor to extend)."""
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        ToDimOrderCopyConfig,
    )

    class HalfConversionConfig(ToDimOrderCopyConfig):
        """``_to_dim_order_copy``: a layout change (as the stock config) or an fp32 <-> fp16
        conversion that keeps the default layout."""

        def check_constraints(self, node, ep) -> bool:
            if not is_half_conversion(node):
                return super().check_constraints(node, ep)
            dims = node.kwargs.get("dim_order")
            contiguous = dims is None or list(dims) == list(range(node.meta["val"].dim()))
            return contiguous and self.check_common_constraints(node, ep)

    if not can_convert_half():
        return list(configs)
    return [HalfConversionConfig if c is ToDimOrderCopyConfig else c for c in configs]
