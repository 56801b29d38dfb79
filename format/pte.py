"""Read what a ``.pte`` program and a ``.ptd`` data file hold, by named key (our own parser).

A ``.ptd`` (ExecuTorch FlatTensor) maps keys to byte blobs. A ``.pte`` needs keys from a data
file in two ways: non-delegated tensors marked EXTERNAL (keyed by FQN) and XNNPACK delegate
constants referenced by ``named_key`` (the sha256 of their bytes) inside the delegate blob.
Keys the program carries in its own named-data segment are not needed from outside.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers

from edgelora.errors import ProgramError

_XNN_BACKEND = "XnnpackBackend"
# The flatbuffer file identifier of the programs ExecuTorch 1.5.1 writes and reads. Checked
# first: its loader logs another identifier's raw bytes, and its Python log bridge cannot decode
# them (a UnicodeDecodeError inside a C++ callback terminates the process; found by fuzzing).
PTE_IDENTIFIER = b"ET12"
PTD_IDENTIFIER = b"FT01"  # the same for data files


@dataclass
class ProgramInfo:
    """The named data a ``.pte`` holds inline and the keys it needs from data files."""

    path: Path
    size: int
    methods: list[str]
    inline: dict[str, int] = field(default_factory=dict)  # key -> bytes, inside the .pte
    needed: set[str] = field(default_factory=set)  # keys that must come from a data file
    # bytes returned by zero-argument methods that return one constant tensor (e.g. the
    # checksums edgelora stamps: get_foundation_sha256, get_program_sha256)
    constants: dict[str, bytes] = field(default_factory=dict)
    constant_bytes: int = 0  # bytes of non-delegated constant tensors inside the .pte


def _read_bytes(path: str | Path, kind: str) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProgramError(f"{path}: {kind} file not found") from None
    except OSError as e:
        raise ProgramError(f"{path}: cannot read {kind} file ({e.strerror})") from None
    if not data:
        raise ProgramError(f"{path}: {kind} file is empty")
    return data


@dataclass(frozen=True)
class DataEntry:
    """One key of a ``.ptd``: its blob's size, and dtype/shape when the file records them
    (plain tensors do; XNNPACK's packed constants are opaque blobs)."""

    size: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


def ptd_entries(path: str | Path) -> dict[str, DataEntry]:
    """Every key of a ``.ptd`` data file with its size and, where known, dtype and shape."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    data = _read_bytes(path, ".ptd")
    if data[4:8] != PTD_IDENTIFIER:
        raise ProgramError(
            f"{path}: not a valid .ptd data file (file identifier {data[4:8]!r}, expected "
            f"{PTD_IDENTIFIER!r})"
        )
    _check_ptd_extent(path, data)
    try:
        payload = FlatTensorSerializer().deserialize(Cord(data))
        out = {}
        for key, entry in payload.named_data.items():
            layout = entry.tensor_layout
            out[key] = DataEntry(
                len(payload.buffers[entry.buffer_index]),
                None if layout is None else layout.scalar_type.name.lower(),
                None if layout is None else tuple(layout.sizes),
            )
        return out
    except Exception as e:  # the deserializer raises assorted errors on corrupt input
        raise ProgramError(
            f"{path}: not a valid .ptd data file ({type(e).__name__}: {e})"
        ) from None


def _check_ptd_extent(path: Path, data: bytes) -> None:
    """The header's flatbuffer and segment ranges must lie inside the file: the deserializer
    slices a truncated file silently (and its flatc helper can crash on one)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader

    try:
        header = FlatTensorHeader.from_bytes(data[8:])
    except ValueError:
        header = None
    if header is None or data[4:8] != b"FT01" or not header.is_valid():
        raise ProgramError(f"{path}: not a valid .ptd data file (no FlatTensor header)")
    end = max(
        header.flatbuffer_offset + header.flatbuffer_size,
        header.segment_base_offset + header.segment_data_size,
    )
    if end > len(data):
        raise ProgramError(
            f"{path}: truncated .ptd data file ({len(data)} bytes; its header needs {end})"
        )


def read_ptd(path: str | Path) -> dict[str, int]:
    """Keys of a ``.ptd`` data file and the size in bytes of each blob."""
    return {key: e.size for key, e in ptd_entries(path).items()}


def _xnnpack_named_keys(blob: bytes) -> set[str]:
    """``named_key``s of ``XNNGraph.constant_data`` in an XNNPACK delegate payload."""
    # Payload: 4 zero bytes, "XH00", u16 header length, u32 flatbuffer offset, u32 size, ...
    if blob[4:8] != b"XH00":
        raise ValueError("XNNPACK payload without XH00 header")
    fb_offset, fb_size = struct.unpack_from("<II", blob, 10)
    buf = bytearray(blob[fb_offset : fb_offset + fb_size])
    root = flatbuffers.table.Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    # XNNGraph field 8 (vtable slot 4 + 2*8) is constant_data:[ConstantDataOffset];
    # ConstantDataOffset field 2 (slot 8) is named_key:string.
    vec_field = root.Offset(4 + 2 * 8)
    keys: set[str] = set()
    if not vec_field:
        return keys
    start, n = root.Vector(vec_field), root.VectorLen(vec_field)
    for i in range(n):
        entry = flatbuffers.table.Table(buf, root.Indirect(start + 4 * i))
        key_field = entry.Offset(8)
        if key_field:
            key = entry.String(key_field + entry.Pos).decode()
            if key:
                keys.add(key)
    return keys


def read_pte(path: str | Path) -> ProgramInfo:
    """Methods, inline named data and the data-file keys a ``.pte`` needs."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import TensorDataLocation

    path = Path(path)
    data = _read_bytes(path, ".pte")
    if data[4:8] != PTE_IDENTIFIER:
        raise ProgramError(
            f"{path}: not a valid .pte program (file identifier {data[4:8]!r}, expected "
            f"{PTE_IDENTIFIER!r})"
        )
    try:
        pte = deserialize_pte_binary(data)
        program = pte.program
        info = ProgramInfo(path, len(data), [plan.name for plan in program.execution_plan])
        if pte.named_data is not None:
            for key, entry in pte.named_data.pte_data.items():
                info.inline[key] = len(pte.named_data.buffers[entry.buffer_index])
        info.constant_bytes = sum(len(b.storage) for b in program.constant_buffer)
        referenced: set[str] = set()
        for plan in program.execution_plan:
            _check_plan(plan, program)
            if not plan.inputs and len(plan.outputs) == 1:
                val = plan.values[plan.outputs[0]].val
                idx = getattr(val, "data_buffer_idx", 0)
                if 0 < idx < len(program.constant_buffer):
                    info.constants[plan.name] = bytes(program.constant_buffer[idx].storage)
            for value in plan.values:
                tensor = value.val
                extra = getattr(tensor, "extra_tensor_info", None)
                if extra is not None and extra.location == TensorDataLocation.EXTERNAL:
                    referenced.add(extra.fully_qualified_name)
            for delegate in plan.delegates:
                if delegate.id != _XNN_BACKEND:
                    continue
                blob = program.backend_delegate_data[delegate.processed.index].data
                referenced |= _xnnpack_named_keys(bytes(blob))
    except ProgramError:
        raise
    except Exception as e:  # corrupt flatbuffers raise assorted errors
        raise ProgramError(f"{path}: not a valid .pte program ({type(e).__name__}: {e})") from None
    info.needed = referenced - set(info.inline)
    return info


# bytes per element of the scalar types our programs use (others are not bounds-checked)
_ELEMENT_BYTES = {
    "BYTE": 1, "CHAR": 1, "BOOL": 1, "QINT8": 1, "QUINT8": 1, "SHORT": 2, "HALF": 2,
    "BFLOAT16": 2, "INT": 4, "FLOAT": 4, "QINT32": 4, "LONG": 8, "DOUBLE": 8,
}  # fmt: skip
_MAX_DIM = 1 << 31


def _check_plan(plan, program) -> None:
    """Every index an execution plan holds is in range, and every planned tensor lies inside
    its memory buffer: ExecuTorch's loader trusts these (an out-of-range operator index
    crashed it in fuzzing, bench/fuzz.py), so a program whose checksum was recomputed over
    bytes that say otherwise is refused here, before the loader sees it. Raises ValueError."""
    from executorch.exir import schema

    name, nv = plan.name, len(plan.values)

    def value(i: int, what: str) -> None:
        if not (isinstance(i, int) and 0 <= i < nv):
            raise ValueError(f"method {name}: {what} {i} is not one of its {nv} values")

    def below(i: int, n: int, what: str) -> None:
        if not (isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"method {name}: {what} {i} is out of range (0..{n - 1})")

    for i in (*plan.inputs, *plan.outputs):
        value(i, "input/output")
    for chain in plan.chains:
        for i in (*chain.inputs, *chain.outputs):
            value(i, "chain input/output")
        for ins in chain.instructions:
            a = ins.instr_args
            if isinstance(a, schema.KernelCall):
                below(a.op_index, len(plan.operators), "operator index")
                for i in a.args:
                    value(i, "kernel argument")
                _check_argument_types(plan, plan.operators[a.op_index], a.args)
            elif isinstance(a, schema.DelegateCall):
                below(a.delegate_index, len(plan.delegates), "delegate index")
                for i in a.args:
                    value(i, "delegate argument")
            elif isinstance(a, schema.MoveCall):
                value(a.move_from, "move source")
                value(a.move_to, "move target")
            elif isinstance(a, schema.JumpFalseCall):
                value(a.cond_value_index, "jump condition")
                below(a.destination_instruction, len(chain.instructions), "jump destination")
            elif isinstance(a, schema.FreeCall):
                value(a.value_index, "freed value")
    constants = max(len(program.constant_buffer), len(program.constant_segment.offsets))
    buffers = plan.non_const_buffer_sizes
    for v in plan.values:
        t = v.val
        if isinstance(t, schema.Tensor):
            if any(not 0 <= d < _MAX_DIM for d in t.sizes):
                raise ValueError(f"method {name}: tensor sizes {list(t.sizes)[:8]} out of range")
            if t.dim_order and sorted(t.dim_order) != list(range(len(t.sizes))):
                raise ValueError(
                    f"method {name}: dim order {list(t.dim_order)} of {len(t.sizes)} dims"
                )
            external = t.extra_tensor_info is not None and t.extra_tensor_info.location == 1
            if t.data_buffer_idx and not external:  # (an external tensor's data is by key)
                below(t.data_buffer_idx, constants, "constant buffer index")
            ai = t.allocation_info
            if ai is not None:
                below(ai.memory_id, len(buffers), "memory id")
                per = _ELEMENT_BYTES.get(getattr(t.scalar_type, "name", ""), 0)
                numel = 1
                for d in t.sizes:
                    numel *= d
                end = (ai.memory_offset_low | ai.memory_offset_high << 32) + numel * per
                if end > buffers[ai.memory_id]:
                    raise ValueError(
                        f"method {name}: a planned tensor ends at byte {end}, past its buffer "
                        f"of {buffers[ai.memory_id]}"
                    )
        elif isinstance(t, (schema.TensorList, schema.OptionalTensorList)):
            for i in t.items:
                if not (isinstance(t, schema.OptionalTensorList) and i == -1):
                    value(i, "list item")
    for d in plan.delegates:
        ref = d.processed
        if ref.location == schema.DataLocation.INLINE:
            below(ref.index, len(program.backend_delegate_data), "delegate data index")
        else:
            below(ref.index, len(program.segments), "delegate segment index")


def _check_argument_types(plan, op, args) -> None:
    """A kernel's arguments have the kinds its schema gives (a Tensor where it takes a Tensor,
    an Int where an int ...): ExecuTorch's kernels read an argument as the kind they expect,
    so an index pointing at a value of another kind crashed the process in fuzzing. Operators
    with no schema in this process (ExecuTorch's own prim ops) are not checked."""
    kinds = _argument_kinds(op.name, op.overload)
    if kinds is None:
        return
    if len(args) < n_arguments(op):
        raise ValueError(
            f"method {plan.name}: {op.name}.{op.overload} takes {n_arguments(op)} arguments, "
            f"the program passes {len(args)}"
        )
    # (the emitter passes the returns after the arguments; a void out-variant, its out list)
    for n, (i, allowed) in enumerate(zip(args, kinds, strict=False)):
        got = type(plan.values[i].val).__name__
        if allowed and got not in allowed:
            raise ValueError(
                f"method {plan.name}: argument {n} of {op.name}.{op.overload} is a {got}, "
                f"not a {' or '.join(sorted(allowed))}"
            )


def n_arguments(op) -> int:
    import torch

    return len(torch._C._get_schema(op.name, op.overload).arguments)


_KINDS: dict[tuple[str, str], list[frozenset[str]] | None] = {}
_SCALAR = {
    "TensorType": "Tensor", "IntType": "Int", "SymIntType": "Int", "FloatType": "Double",
    "SymFloatType": "Double", "BoolType": "Bool", "SymBoolType": "Bool", "StringType": "String",
    "ScalarTypeType": "Int", "LayoutType": "Int", "MemoryFormatType": "Int",
}  # fmt: skip
_LISTS = {"IntType": "IntList", "SymIntType": "IntList", "TensorType": "TensorList",
          "FloatType": "DoubleList", "BoolType": "BoolList"}  # fmt: skip


def _argument_kinds(name: str, overload: str) -> list[frozenset[str]] | None:
    """The EValue kinds each argument (then each return) of an operator may be; an empty set
    where any is allowed; ``None`` if the operator has no schema here."""
    key = (name, overload)
    if key not in _KINDS:
        import torch

        try:
            s = torch._C._get_schema(name, overload)
        except RuntimeError:
            _KINDS[key] = None
        else:
            _KINDS[key] = [_kinds(a.type) for a in (*s.arguments, *s.returns)]
    return _KINDS[key]


def _kinds(t) -> frozenset[str]:
    kind = t.kind()
    if kind == "OptionalType":
        inner = _kinds(t.getElementType())
        return inner | {"Null"} if inner else inner
    if kind == "NumberType":
        return frozenset({"Int", "Double", "Bool"})
    if kind == "ListType":
        elem = t.getElementType()
        if elem.kind() == "OptionalType" and elem.getElementType().kind() == "TensorType":
            return frozenset({"OptionalTensorList"})
        return frozenset({_LISTS[elem.kind()]}) if elem.kind() in _LISTS else frozenset()
    return frozenset({_SCALAR[kind]}) if kind in _SCALAR else frozenset()


def missing_keys(pte: str | Path, ptd: str | Path | None) -> set[str]:
    """Keys ``pte`` needs that the data file ``ptd`` (or no data file) does not provide."""
    needed = read_pte(pte).needed
    return needed - set(read_ptd(ptd)) if ptd is not None else needed
