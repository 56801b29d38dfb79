"""Every change edgelora makes to ExecuTorch's or PyTorch's behaviour while it lowers a program,
in one place, behind one context manager: :func:`lowering_patches`.

They are measured to leave the programs byte-identical (``tests/backends/test_lower.py``) and
exist for time and memory:

- :func:`lean_xnnpack_passes`: XNNPACK's per-partition pass pipeline skips the passes whose ops
  a partition does not hold (``XNNPACKPassManager.__init__``);
- :func:`shared_constants_in_preprocess`: the copy of each partition made for preprocessing
  shares the constant tensors instead of deep-copying them
  (``XnnpackBackend.copy_exported_program_for_preprocess``);
- :func:`no_redundant_decompositions`: ``ExportedProgram.run_decompositions`` on a program
  already decomposed for XNNPACK returns it when the table has nothing left to do;
- :func:`half_conversion_visitor`: XNNPACK's ``_to_copy`` visitor also writes fp32 <-> fp16
  conversions as ``XNNConvert`` (for fp16 adapters in an fp32 model; ``half.py``);
- :func:`forget_rejected_nodes` (on exit): module-level caches that held every lowered graph.

Each patches private API of the pinned versions (:data:`PINNED`). With any other version
installed, :func:`lowering_patches` warns once and lowers with ExecuTorch's stock pipeline
(slower, more memory, the same programs). Nothing stays patched after the ``with`` block.
"""

from __future__ import annotations

import copy
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata

import torch
from torch.export import ExportedProgram

PINNED = {"executorch": "1.5.1", "torch": "2.13.0"}


def version_mismatches() -> list[str]:
    """``name installed (pinned X)`` for each pinned package installed at another version."""
    out = []
    for name, want in PINNED.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have.split("+")[0] != want:
            out.append(f"{name} {have} (pinned {want})")
    return out


_warned: list[str] = []


@contextmanager
def lowering_patches(
    lean: bool = True,
    on_partition: Callable[[int], None] | None = None,
    *,
    half_conversions: bool = False,
) -> Iterator[dict[str, int]]:
    """While active, the patches above (``lean=False``: none but the partition counter); yields
    counts (``partitions``, ``skipped`` passes). ``on_partition(n)`` is told as the n-th
    partition starts its passes (for progress). Falls back to the stock pipeline, with a
    warning, when the installed versions are not the pinned ones."""
    off = version_mismatches()
    if lean and off:
        if off != _warned:
            warnings.warn(
                f"edgelora: {', '.join(off)}: lowering with ExecuTorch's stock pipeline (the "
                "same programs, slower and with more memory)",
                stacklevel=3,
            )
            _warned[:] = off
        lean = False
    with ExitStack() as stack:
        counts = stack.enter_context(lean_xnnpack_passes(lean, on_partition))
        if half_conversions:
            stack.enter_context(half_conversion_visitor())
        if lean:
            stack.enter_context(shared_constants_in_preprocess())
            stack.enter_context(no_redundant_decompositions())
        try:
            yield counts
        finally:
            forget_rejected_nodes()


# --- XNNPACK's pass pipeline ----------------------------------------------------------------

# XNNPACK's preprocessing runs a fixed pipeline of ~15 graph passes on every partition; most
# rewrite a few op kinds and walk the whole graph to find none. A pass listed here runs only on
# a partition holding one of the named ops (substrings of the op names, taken before the first
# pass runs); a partition without any skips them. The programs are byte-identical either way
# (tests/backends/test_lower.py checks it).
#
# The channels-last pass changes a graph only around a node that wants NHWC input (its
# ``memory_sensitive_ops_nhwc``) or a channels-last copy: without them every tensor stays NCHW
# and it inserts nothing (it marks 4-D constants NCHW, which the serializer reads as the default
# anyway). The copy-removal pass after it needs a copy, from the graph or from that pass.
_NHWC = ("convolution", "upsample", "mean.dim", "max_pool2d", "avg_pool2d", "amax", "max.dim",
         "prelu", "_to_copy", "_to_dim_order_copy")  # fmt: skip
PASS_NEEDS = {
    "ConvertToUpsampleBilinear2d": ("upsample", "index"),
    "ConvertToSDPAPass": ("_softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "max.dim"),
    "ConvertToLinearPass": ("mm",),  # mm, addmm, bmm (and linear's decompositions to them)
    "PropagateCustomMetaPass": ("quantize",),  # q/dq nodes (quantize_*, dequantize_*)
    "FuseActivationPass": ("relu", "hardtanh"),
    "DecomposeConcatenate": ("cat",),
    "ChannelsLastTaggedReshapePass": _NHWC,
    "RemoveRedundantCopyPass": _NHWC,
}


@contextmanager
def lean_xnnpack_passes(
    enabled: bool = True, on_partition: Callable[[int], None] | None = None
) -> Iterator[dict[str, int]]:
    """While active, XNNPACK's partition pass pipeline skips the passes of :data:`PASS_NEEDS`
    on a partition without their ops (``enabled``); yields counts (``partitions``, ``skipped``
    passes). ``on_partition(n)`` is told as the n-th partition starts its passes."""
    from executorch.backends.xnnpack import _passes

    counts = {"partitions": 0, "skipped": 0}
    init = _passes.XNNPACKPassManager.__init__

    def lean_init(self, exported_program, passes=None):
        init(self, exported_program, passes)
        counts["partitions"] += 1
        if on_partition is not None:
            on_partition(counts["partitions"])
        if not enabled:
            return
        ops = " ".join(
            str(n.target) for n in exported_program.graph.nodes if n.op == "call_function"
        )
        kept = [
            p
            for p in self.passes
            if p.__name__ not in PASS_NEEDS or any(op in ops for op in PASS_NEEDS[p.__name__])
        ]
        counts["skipped"] += len(self.passes) - len(kept)
        self.passes = kept

    _passes.XNNPACKPassManager.__init__ = lean_init
    try:
        yield counts
    finally:
        _passes.XNNPACKPassManager.__init__ = init


# --- the partition copies -------------------------------------------------------------------


@contextmanager
def shared_constants_in_preprocess() -> Iterator[None]:
    """While active, the copy of each partition ExecuTorch makes for XNNPACK's preprocessing
    shares the partition's constant tensors instead of deep-copying them.

    ExecuTorch copies every partition's program (graph *and* weights) before preprocessing
    any, and keeps the copies until the last partition is compiled: a second copy of every
    quantized weight (~1.5 GB at Llama-3.2-1B) on top of the model and XNNPACK's packed
    weights. XNNPACK's passes replace constants, never write into them (the programs are
    byte-identical and the source weights unchanged, tests/backends/test_lower.py), so the
    graph is copied and the tensors shared -- as ExecuTorch's own CUDA backend does in its
    low-memory mode."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    name = "copy_exported_program_for_preprocess"
    own = XnnpackBackend.__dict__.get(name)  # None: inherited from BackendDetails

    def share(cls, edge_program, compile_specs):
        memo = {
            id(t): t
            for values in (edge_program.state_dict, edge_program.constants)
            for t in values.values()
            if isinstance(t, torch.Tensor)
        }
        return copy.deepcopy(edge_program, memo)

    setattr(XnnpackBackend, name, classmethod(share))
    try:
        yield
    finally:
        if own is None:
            delattr(XnnpackBackend, name)
        else:
            setattr(XnnpackBackend, name, own)


# --- the decompositions ---------------------------------------------------------------------

# Programs decomposed for XNNPACK already (functional, decomposed): see
# no_redundant_decompositions. The lowering adds a program before it lowers it and discards it
# after (ExecuTorch then works on the traced program itself, so one lowered is not lowered
# again through this shortcut).
DECOMPOSED: weakref.WeakSet = weakref.WeakSet()


@contextmanager
def no_redundant_decompositions() -> Iterator[None]:
    """While active, ``run_decompositions`` on a program in :data:`DECOMPOSED` returns that
    program when the table has nothing left to do in it.

    ``to_edge_transform_and_lower`` re-traces every program twice more: once to functionalize
    it (an empty table; ours is functional already) and once with the decomposition table
    whenever the graph holds one of its ops -- which a dynamic-shape graph always does, since
    ``aten.sym_size.int`` is in the table and survives any decomposition. Each is a whole-graph
    re-trace on fake tensors (1.3-1.6 s for a one-layer program here). The programs are
    byte-identical either way (tests/backends/test_lower.py checks it)."""
    run = ExportedProgram.run_decompositions
    inert = {torch.ops.aten.sym_size.int}

    def lean_run(self, decomp_table=None, *args, **kwargs):
        if self in DECOMPOSED and decomp_table is not None and not args and not kwargs:
            left = {
                n.target
                for n in self.graph.nodes
                if n.op == "call_function" and n.target in decomp_table
            }
            if left <= inert:
                return self
        return run(self, decomp_table, *args, **kwargs)

    ExportedProgram.run_decompositions = lean_run
    try:
        yield
    finally:
        ExportedProgram.run_decompositions = run


# --- fp32 <-> fp16 conversions in the delegate ----------------------------------------------

TO_COPY = "aten._to_copy.default"


def is_half_conversion(node: torch.fx.Node) -> bool:
    """A copy between fp32 and fp16 (either way)."""
    from executorch.backends.xnnpack.utils.utils import get_input_node

    src, dst = get_input_node(node, 0).meta["val"].dtype, node.meta["val"].dtype
    return src != dst and {src, dst} == {torch.float32, torch.float16}


def can_convert_half() -> bool:
    """Whether this ExecuTorch has the ``_to_copy`` visitor :func:`half_conversion_visitor`
    extends."""
    from executorch.backends.xnnpack.operators import node_visitor

    return TO_COPY in node_visitor._node_visitor_dict


@contextmanager
def half_conversion_visitor() -> Iterator[None]:
    """While active, XNNPACK's ``_to_copy`` visitor writes an fp32 <-> fp16 conversion as an
    ``XNNConvert`` node (any other copy as before); the stock visitor is put back on exit."""
    from executorch.backends.xnnpack.operators import node_visitor
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConvert, XNode
    from executorch.backends.xnnpack.utils.utils import get_input_node

    visitors = node_visitor._node_visitor_dict
    stock = visitors.get(TO_COPY)
    if stock is None:
        yield
        return

    class HalfConversionVisitor(stock):
        """``_to_copy`` between fp32 and fp16 as ``XNNConvert``; any other copy as before."""

        def define_node(self, node, xnn_graph, vals_to_ids, debug_handle) -> None:
            if not is_half_conversion(node):
                return super().define_node(node, xnn_graph, vals_to_ids, debug_handle)
            src = get_input_node(node, 0)
            self.define_tensor(src, xnn_graph, vals_to_ids)
            self.define_tensor(node, xnn_graph, vals_to_ids)
            convert = XNNConvert(input_id=vals_to_ids[src], output_id=vals_to_ids[node], flags=0)
            xnn_graph.xnodes.append(XNode(xnode_union=convert, debug_handle=debug_handle))

    visitors[TO_COPY] = HalfConversionVisitor
    try:
        yield
    finally:
        visitors[TO_COPY] = stock


# --- state ExecuTorch keeps -----------------------------------------------------------------


def forget_rejected_nodes() -> None:
    """Drop the graph nodes ExecuTorch keeps in module-level state after a lowering: the
    unbounded ``lru_cache`` of ``exir.backend.utils.is_same_node`` and the last node each
    ``WhyNoPartition`` logger rejected. Through their graphs they held every lowered program
    -- XNNPACK's packed weights included, ~0.9 GB per program at 1B -- for the whole export."""
    from executorch.exir.backend import utils
    from executorch.exir.backend.utils import WhyNoPartition

    cache_clear = getattr(utils.is_same_node, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()

    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("executorch."):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, WhyNoPartition):
                value.node = None
