"""Lower an exported program to XNNPACK and split its constants: foundation vs adapter.

Every non-adapter constant -- delegated (XNNPACK's packed weights and their scales) or not
(embedding, norms, RoPE tables) -- is tagged for the external data file ``foundation.ptd``;
adapter constants (the ``lora_a``/``lora_b`` weights) carry no tag and stay inside the
program's ``.pte``. Which constant is which is decided from the exported program's graph
signature, which maps each constant placeholder to the FQN of the module tree we built, not
from substrings of graph node names.

XNNPACK stores delegated constants under the sha256 of their bytes, so the foundation of a
base-only export and of any adapter export hold the same keys and bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import ExportedProgram

from edgelora.backends.xnnpack.patches import DECOMPOSED, forget_rejected_nodes, lowering_patches

FOUNDATION_TAG = "foundation"
# XNNPACK reads this key of node.meta["custom"] to send a delegated constant to a data file.
_DELEGATE_TAG_KEY = "delegate_constant_tag"


def constant_fqns(ep: ExportedProgram) -> dict[str, str]:
    """Placeholder name -> FQN for every constant input (parameters, non-mutated buffers,
    lifted tensor constants) of ``ep``. Mutated buffers (the KV cache) are state, not constants.
    """
    sig = ep.graph_signature
    mutated = set(sig.buffers_to_mutate.values())
    out = dict(sig.inputs_to_parameters)
    out.update({k: v for k, v in sig.inputs_to_buffers.items() if v not in mutated})
    out.update(sig.inputs_to_lifted_tensor_constants)
    return out


@dataclass(frozen=True)
class ConstantSplit:
    """Which constant FQNs of one program go to the foundation and which stay in the program."""

    foundation: frozenset[str]
    adapter: frozenset[str]
    # Adapter constants whose bytes equal a foundation constant's: XNNPACK keys a constant by
    # the sha256 of its bytes, so both are one key, which must live in one file -- the
    # foundation, where it already is (see tag_foundation_constants).
    shared: frozenset[str] = frozenset()


def tag_foundation_constants(
    ep: ExportedProgram, is_adapter: Callable[[str], bool]
) -> ConstantSplit:
    """Tag ``ep``'s foundation constants for XNNPACK, in place, before partitioning.

    A constant is a foundation constant unless ``is_adapter(fqn)``. The tag is set on the
    constant placeholders and on every node computed only from foundation constants (e.g. the
    ``dequantize_affine`` of a quantized weight), because XNNPACK reads the tag from the node
    it serialises, which for a quantized weight is not the placeholder itself.
    """
    fqns = constant_fqns(ep)
    values = _constant_values(ep)
    # Only a foundation constant of an adapter constant's size in bytes can hold its bytes:
    # hash those alone (a base program hashes nothing; 1B's foundation is ~1.4 GB to hash).
    kinds = {_kind(values[f]) for f in fqns.values() if is_adapter(f) and f in values}
    foundation_bytes = {
        _digest(values[f])
        for f in fqns.values()
        if not is_adapter(f) and f in values and _kind(values[f]) in kinds
    }
    foundation_node: dict[torch.fx.Node, bool] = {}
    split_f, split_a, shared = set(), set(), set()
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in fqns:
            fqn = fqns[node.name]
            is_f = not is_adapter(fqn)
            if not is_f and fqn in values and _digest(values[fqn]) in foundation_bytes:
                is_f = True  # same bytes, same XNNPACK key: served by the foundation
                shared.add(fqn)
            (split_f if is_f and fqn not in shared else split_a).add(fqn)
            foundation_node[node] = is_f
        elif node.op == "call_function":
            inputs = node.all_input_nodes
            if inputs and all(i in foundation_node for i in inputs):
                foundation_node[node] = all(foundation_node[i] for i in inputs)
        else:
            continue
        if foundation_node.get(node):
            node.meta.setdefault("custom", {})[_DELEGATE_TAG_KEY] = FOUNDATION_TAG
    return ConstantSplit(frozenset(split_f), frozenset(split_a), frozenset(shared))


def _constant_values(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    values = dict(ep.state_dict)
    values.update(ep.constants)
    return values


def _kind(t: torch.Tensor) -> tuple:
    t = t.detach()  # a Parameter is a plain tensor here, as in _digest
    if hasattr(t, "tensor_impls") or type(t) is not torch.Tensor:  # see _digest
        return type(t), id(t)
    return (t.numel() * t.element_size(),)


def _digest(t: torch.Tensor) -> bytes:
    import hashlib

    t = t.detach()
    if hasattr(t, "tensor_impls") or type(t) is not torch.Tensor:  # tensor subclasses
        return hashlib.sha256(repr((type(t), id(t))).encode()).digest()
    return hashlib.sha256(t.contiguous().flatten().view(torch.uint8).numpy().tobytes()).digest()


# Prefix of the constants we name by content (see name_derived_constants).
DERIVED_PREFIX = "_derived_"
_PROP_PREFIX = "_prop_tensor_constant"  # ExecuTorch's const-prop names: a per-program counter


def name_derived_constants(ep: ExportedProgram) -> dict[str, bytes]:
    """Rename the constants a pass made (ExecuTorch's const-prop: ``_prop_tensor_constantN``,
    e.g. the packed weight of the fused 4-bit embedding) after the sha256 of their bytes, in
    place; returns ``new name -> digest``.

    The counter N depends on what else the program holds, so the same bytes had different
    names -- and so different data-file keys -- in the base and an adapter program. Named by
    content, a constant derived from foundation weights has one key in every program, and can
    live in the one ``foundation.ptd``. Two constants of one program with the same bytes
    become one placeholder.
    """
    from torch.export.graph_signature import InputKind

    sig = ep.graph_signature
    by_name = {s.arg.name: s for s in sig.input_specs}
    kept: dict[str, torch.fx.Node] = {}
    digests: dict[str, bytes] = {}
    for node in list(ep.graph.find_nodes(op="placeholder")):
        spec = by_name.get(node.name)
        if (
            spec is None
            or spec.kind != InputKind.CONSTANT_TENSOR
            or not str(spec.target).startswith(_PROP_PREFIX)
        ):
            continue
        value = ep.constants.pop(spec.target)
        digest = _digest(value)
        name = DERIVED_PREFIX + digest.hex()[:32]
        if name in kept:  # same bytes twice in one program: one constant
            node.replace_all_uses_with(kept[name])
            ep.graph.erase_node(node)
            sig.input_specs = [s for s in sig.input_specs if s is not spec]
            continue
        node._rename(name)
        if node.name != name:
            raise RuntimeError(f"internal error: cannot name constant {spec.target} as {name}")
        node.target = name
        spec.arg.name = name
        spec.target = name
        ep.constants[name] = value
        kept[name] = node
        digests[name] = digest
    ep.graph_module.recompile()
    return digests


def _external_constant_tagger(
    eps: list[ExportedProgram],
    is_adapter: Callable[[str], bool],
    derived_in_foundation: Callable[[str], bool],
) -> Callable[[torch.fx.Node], str | None]:
    """The ``external_constants`` callable for ``to_executorch``: tags the constants that were
    not delegated (embedding, norms, RoPE tables) by the FQN the signature gives them. With
    several methods, a placeholder name means the same FQN in each (one module tree).
    A constant made by a pass (named by content) goes to the foundation when
    ``derived_in_foundation(name)``."""
    fqns: dict[str, str] = {}
    for ep in eps:
        for name, fqn in constant_fqns(ep).items():
            if fqns.setdefault(name, fqn) != fqn:
                raise ValueError(f"placeholder {name} is {fqns[name]} and {fqn} in two methods")

    def tag(node: torch.fx.Node) -> str | None:
        fqn = fqns.get(node.name)
        if fqn is None or is_adapter(fqn):
            return None
        if fqn.startswith(DERIVED_PREFIX) and not derived_in_foundation(fqn):
            return None
        return FOUNDATION_TAG

    return tag


def _partitioner(half_conversions: bool = False):
    """XNNPACK's partitioner, letting ExecuTorch decompose the graph once instead of twice.

    It keeps some ops whole (``linear``, ...) for XNNPACK, with a check per node; with a check,
    ExecuTorch decomposes everything else, marks the nodes passing it, and decomposes the graph
    a second time (the failing nodes). When every such node passes, the second pass changes
    nothing: we then return no check, and ExecuTorch keeps the ops and decomposes once -- the
    same program (checked byte for byte in tests), one whole-graph retrace less. It also
    delegates fp32 <-> fp16 conversions if asked (:mod:`edgelora.backends.xnnpack.half`): only
    for a program whose only such conversions are its fp16 adapter's (an fp16 model's own
    conversions stay as they were, in every program alike). It delegates linears with int8
    weights under fp32 activations (:mod:`edgelora.backends.xnnpack.weight_only`), which the
    stock partitioner does not: an int8 adapter's."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from edgelora.backends.xnnpack.half import replace_copy_config
    from edgelora.backends.xnnpack.weight_only import replace_linear_config

    configs = replace_linear_config(list(ALL_PARTITIONER_CONFIGS))
    if half_conversions:
        configs = replace_copy_config(configs)

    class Partitioner(XnnpackPartitioner):
        lean, partitions = True, 0

        def __init__(self) -> None:
            super().__init__(configs=configs)

        def partition(self, exported_program):
            result = super().partition(exported_program)
            self.partitions += len(result.partition_tags)
            return result

        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            if check is None or not self.lean:
                return ops, check
            kept = set(ops)
            for node in ep.graph.nodes:
                if node.op == "call_function" and node.target in kept and not check(node):
                    return ops, check
            return ops, None

    return Partitioner


def decompose_for_xnnpack(ep: ExportedProgram) -> ExportedProgram:
    """``ep`` functionalized and decomposed to core ATen, keeping whole the ops XNNPACK takes
    whole (``linear``, ...): the decomposition ``to_edge_transform_and_lower`` would do, done
    as the program is traced, so the lowering finds nothing left to decompose and skips its own
    whole-graph pass (one re-trace of the whole model less per program)."""
    from executorch.exir.tracer import _default_decomposition_table

    table = _default_decomposition_table()
    ops, _ = _partitioner()().ops_to_not_decompose(ep)
    for op in ops:
        table.pop(op, None)
    decomposed = ep.run_decompositions(table)
    DECOMPOSED.add(decomposed)  # (patches.no_redundant_decompositions)
    return decomposed


@dataclass
class LoweredProgram:
    """A lowered program ready to serialise: the ``.pte`` and its external data file(s)."""

    manager: object  # executorch.exir.ExecutorchProgramManager
    split: ConstantSplit
    # Pass-made constants (named by content) this program sends to the foundation.
    derived_foundation: frozenset[str] = frozenset()

    def write_pte(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            self.manager.write_to_file(f)

    def data_file_digests(self) -> dict[str, str] | None:
        """``<tag>.ptd`` -> the sha256 of the bytes :meth:`write_data_files` would write, hashed
        from memory (nothing written); ``None`` if this ExecuTorch keeps them elsewhere."""
        import hashlib

        data = getattr(self.manager, "_tensor_data", None)  # what write_tensor_data_to_file writes
        if not isinstance(data, dict):
            return None

        class _Hasher:
            def __init__(self) -> None:
                self.h = hashlib.sha256()

            def write(self, b) -> int:
                self.h.update(b)
                return len(b)

        out = {}
        for name, cord in data.items():
            hasher = _Hasher()
            cord.write_to_file(hasher)
            out[f"{name}.ptd"] = hasher.h.hexdigest()
        return out

    def write_data_files(self, directory: str | Path) -> list[Path]:
        """Write ``<tag>.ptd`` files into ``directory``; returns their paths."""
        before = set(Path(directory).glob("*.ptd"))
        self.manager.write_tensor_data_to_file(str(directory))
        return sorted(set(Path(directory).glob("*.ptd")) - before)


def lower_to_xnnpack(
    ep: ExportedProgram | dict[str, ExportedProgram],
    *,
    is_adapter: Callable[[str], bool],
    constant_methods: dict[str, object] | None = None,
    foundation_derived: frozenset[str] | None = None,
    lean: bool = True,
    progress: Callable[[int, int], None] | None = None,
    half_conversions: bool = False,
) -> LoweredProgram:
    """Lower ``ep`` with ``XnnpackPartitioner``; foundation constants go to ``foundation.ptd``.

    The returned program writes ``<name>.pte`` and ``foundation.ptd``. ``ep`` may be a dict
    ``method name -> ExportedProgram`` (e.g. ``base`` and one method per adapter): one
    multi-method program whose methods share the foundation's keys. ``constant_methods``
    become zero-argument methods of the program (runner metadata).

    Constants made by ExecuTorch's passes (the packed 4-bit embedding) are named by content.
    ``foundation_derived`` is the set of such names the base program put in the foundation
    (its ``derived_foundation``): an adapter program sends those there and keeps the others,
    which may be derived from adapter weights. Without it (the base program), a program with
    no adapter constant sends all of them to the foundation. ``lean=False`` runs ExecuTorch's
    stock lowering (none of :mod:`edgelora.backends.xnnpack.patches`).
    ``progress(done, total)`` is called as each XNNPACK partition is compiled.
    ``half_conversions``: delegate fp32 <-> fp16 conversions (an fp16 adapter in an fp32 model).
    """
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import quant_fusion_and_const_prop_pass

    methods = ep if isinstance(ep, dict) else {"forward": ep}
    splits = [tag_foundation_constants(m, is_adapter) for m in methods.values()]
    split = ConstantSplit(
        frozenset().union(*(s.foundation for s in splits)),
        frozenset().union(*(s.adapter for s in splits)),
        frozenset().union(*(s.shared for s in splits)),
    )
    partitioner = _partitioner(half_conversions)()
    partitioner.lean = lean

    def on_partition(n: int) -> None:
        if progress is not None:
            progress(n, max(n, partitioner.partitions))

    try:
        with lowering_patches(lean, on_partition, half_conversions=half_conversions):
            edge = to_edge_transform_and_lower(
                methods,
                partitioner=[partitioner],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
                constant_methods=constant_methods,
            )
    finally:
        for m in methods.values():
            DECOMPOSED.discard(m)
    import gc

    from edgelora._memory import release_free_memory

    gc.collect()  # the intermediate programs of the passes (reference cycles) before emitting
    release_free_memory()
    derived: set[str] = set()
    for name in methods:
        # Fuses torchao dequantize_affine + embedding into quantized embedding kernels and
        # folds the weight packing into constants (in place), which we then name by content.
        quant_fusion_and_const_prop_pass(edge.exported_program(name))
        derived.update(name_derived_constants(edge.exported_program(name)))
    if foundation_derived is None:
        foundation_derived = frozenset(derived) if not split.adapter else frozenset()
    derived_foundation = frozenset(derived & foundation_derived)
    tagger = _external_constant_tagger(
        [edge.exported_program(name) for name in methods],
        is_adapter,
        derived_foundation.__contains__,
    )
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=False,  # done above
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            external_constants=tagger,
        )
    )
    forget_rejected_nodes()  # again: emitting the program looked nodes up too
    return LoweredProgram(manager=et, split=split, derived_foundation=derived_foundation)
