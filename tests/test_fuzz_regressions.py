"""Regression cases from fuzzing (``bench/fuzz.py``): each input it found that crashed a process
or escaped our errors, rebuilt here from a shared export, must be refused with one line.

- **An argument of the wrong kind** (fuzzing, ``pte`` target: ``aten::select_copy.int_out``'s
  ``int dim`` pointed at a Tensor value). The kernel read the Tensor as an int and the process
  died. Every kernel call's arguments are now checked against the operator's schema.
- **An out-of-range operator index** (fuzzing, ``pte`` target: one byte of a ``KernelCall``'s
  ``op_index``, 8 -> 553648136, with the checksum recomputed). Our parser accepted it and
  ExecuTorch's loader crashed the process running it. ``format/pte.py`` now checks every index
  of an execution plan and every planned tensor's bounds; the neighbouring cases below (a value,
  delegate or jump index out of range, a planned tensor past its buffer) are refused by the same
  checks.
- **A shard index whose weight map holds an object** (fuzzing, ``shard-index`` target):
  ``TypeError: unhashable type: 'dict'`` escaped ``open_checkpoint``. Every shard name is now
  checked (a string, a plain file name, not ``..``) before any is used.
- **A config.json whose ``architectures`` is a number** (fuzzing, ``config`` target):
  ``TypeError: 'int' object is not iterable`` escaped. ``architectures`` must be a list of
  names and ``model_type`` a string.
- **A config.json field of the wrong type** (fuzzing, the CI smoke's ``config`` target):
  ``layer_types: 0.0`` ended in ``TypeError: 'float' object is not iterable``. Every field the
  family readers use now has its JSON type checked first (a ConfigError naming it), NaN and
  Infinity are refused as JSON, and a value out of range is a ConfigError too.
- **A tokenizer.json whose merge makes a token the vocabulary lacks** (fuzzing, the CI smoke's
  ``tokenizer`` target): the Rust ``tokenizers`` library *panics* on it (when the token holds a
  multi-byte character), and a panic is a ``BaseException`` that escaped ``load_tokenizer``.
- **A mutated ``.pth``** (fuzzing, the CI smoke's ``pth`` target): ``torch.load`` raised
  ``AttributeError``/``IndexError`` that escaped. Any failure of ``torch.load`` is now one
  CheckpointError; every byte of a small checkpoint's pickle is varied below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.errors import ProgramError
from edgelora.format.checksums import PROGRAM_SHA_METHOD, restamp, verify_program
from edgelora.format.pte import read_pte


def _first(plan, kind):
    for chain in plan.chains:
        for ins in chain.instructions:
            if type(ins.instr_args).__name__ == kind:
                return ins.instr_args
    raise AssertionError(f"no {kind} in {plan.name}")


def _forward(pte):
    return next(p for p in pte.program.execution_plan if p.name == "forward")


def _planned(plan):
    return next(v.val for v in plan.values if getattr(v.val, "allocation_info", None) is not None)


def _int_argument_gets_a_tensor(pte) -> None:
    """The first kernel call taking (Tensor, int, ...) gets its tensor where the int goes."""
    plan = _forward(pte)
    for chain in plan.chains:
        for ins in chain.instructions:
            a = ins.instr_args
            kinds = [type(plan.values[i].val).__name__ for i in getattr(a, "args", [])[:2]]
            if type(a).__name__ == "KernelCall" and kinds == ["Tensor", "Int"]:
                a.args[1] = a.args[0]
                return
    raise AssertionError("no kernel call taking (Tensor, int)")


MUTATIONS = {
    # fuzzing: aten::select_copy.int_out's int dim pointing at a Tensor value crashed the process
    "argument-kind": (_int_argument_gets_a_tensor, "is a Tensor, not a Int"),
    "operator-index": (
        lambda pte: setattr(_first(_forward(pte), "KernelCall"), "op_index", 553648136),
        "operator index 553648136",
    ),
    "kernel-argument": (
        lambda pte: _first(_forward(pte), "KernelCall").args.__setitem__(0, 10**6),
        "kernel argument 1000000",
    ),
    "delegate-index": (
        lambda pte: setattr(_first(_forward(pte), "DelegateCall"), "delegate_index", 7),
        "delegate index 7",
    ),
    "planned-tensor-past-its-buffer": (
        lambda pte: _planned(_forward(pte)).sizes.__setitem__(0, 1 << 30),
        "past its buffer",
    ),
    "output-index": (lambda pte: _forward(pte).outputs.__setitem__(0, -1), "input/output -1"),
}


def _mutant(src: Path, dst: Path, mutate) -> Path:
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary

    pte = deserialize_pte_binary(src.read_bytes())
    mutate(pte)
    data = bytes(serialize_pte_binary(pte, extract_delegate_segments=True))
    own = read_pte(src).constants[PROGRAM_SHA_METHOD]
    assert data.count(own) == 1
    dst.write_bytes(restamp(data, data.index(own)))  # a valid checksum: only the parser stands
    return dst


def test_round_trip_is_accepted(export_8da4w, tmp_path):
    """(The mutants are made by ExecuTorch's own serializer; unmutated, it gives a program our
    checks accept.)"""
    same = _mutant(export_8da4w / "chat.pte", tmp_path / "same.pte", lambda pte: None)
    verify_program(same, export_8da4w / "foundation.ptd")


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_corrupt_plan_is_refused_before_the_loader(case, export_8da4w, tmp_path):
    mutate, message = MUTATIONS[case]
    bad = _mutant(export_8da4w / "chat.pte", tmp_path / f"{case}.pte", mutate)
    with pytest.raises(ProgramError, match="not a valid .pte program") as e:
        verify_program(bad, export_8da4w / "foundation.ptd")
    assert message in str(e.value)
    # the tool, in a process of its own (the loader would have crashed it): one line, exit 2
    proc = subprocess.run(
        [sys.executable, "-m", "edgelora.runtime.cli", str(bad), "--data"]
        + [str(export_8da4w / "foundation.ptd"), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_another_file_identifier_is_refused_before_the_loader(export_8da4w, tmp_path):
    """Fuzzing: a program whose flatbuffer file identifier is not ``ET12`` passed our parser
    (ExecuTorch's deserializer does not check it); its loader then logged the raw bytes, which
    the Python log bridge could not decode, and the process terminated."""
    src = export_8da4w / "chat.pte"
    data = bytearray(src.read_bytes())
    data[4:8] = b"\xff" * 4
    own = read_pte(src).constants[PROGRAM_SHA_METHOD]
    bad = tmp_path / "bad.pte"
    bad.write_bytes(restamp(bytes(data), bytes(data).index(own)))  # only the parser stands
    with pytest.raises(ProgramError, match=r"file identifier b'\\xff\\xff\\xff\\xff'"):
        verify_program(bad, export_8da4w / "foundation.ptd")
    proc = subprocess.run(
        [sys.executable, "-m", "edgelora.runtime.cli", str(bad), "--data"]
        + [str(export_8da4w / "foundation.ptd"), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "file identifier" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "shard", [{"a": 1}, ["x"], 7, None, "..", "", "../model.safetensors", "/etc/passwd"]
)
def test_bad_shard_names_in_an_index(shard, tmp_path):
    from edgelora.errors import CheckpointError
    from edgelora.weights.checkpoint import open_checkpoint

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="bad shard file name"):
        open_checkpoint(d)


@pytest.mark.parametrize(
    "change", [{"architectures": 5}, {"architectures": [1]}, {"model_type": ["llama"]}]
)
def test_config_architectures_of_the_wrong_type(change, tmp_path):
    from edgelora.errors import ConfigError
    from edgelora.weights.architectures import find_architecture

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **change}
    with pytest.raises(ConfigError, match="must be a"):
        find_architecture(cfg, "config.json")


def test_every_byte_of_a_pth_pickle_changed(tmp_path):
    """Fuzzing (``pth`` target, the CI smoke): ``torch.load(weights_only=True)`` of a mutated
    ``.pth`` raised ``AttributeError: 'tuple' object has no attribute 'dtype'``, which escaped.
    Here every byte of a small checkpoint's pickle is set to four values in turn: each file is
    read or refused with a CheckpointError, nothing else."""
    import torch

    from edgelora.errors import CheckpointError
    from edgelora.weights.tensor_files import read_state_dict

    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.float16)}, good)
    blob = good.read_bytes()
    start = blob.index(b"\x80\x02")  # the pickle (protocol 2) inside the zip
    end = blob.index(b".", start) + 1
    escaped = []
    bad = tmp_path / "bad.pth"
    for i in range(start, end):
        for value in (0x00, 0x30, 0x7F, 0xFF):
            b = bytearray(blob)
            b[i] = value
            bad.write_bytes(bytes(b))
            try:
                read_state_dict(bad)
            except CheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 - what the test is for
                escaped.append((i - start, value, f"{type(e).__name__}: {e}"))
    assert not escaped, escaped[:5]


_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
}


def _wrong_values(kind: str) -> list:
    return [v for v in ("x", 1.5, True, [1], {"a": 1}) if not _is_kind(v, kind)]


def _is_kind(value, kind) -> bool:
    from edgelora.weights.families.base import _is

    return _is(value, kind)


def test_every_config_field_of_the_wrong_type_is_named():
    """Each field a family reader uses, given each JSON type it must not have, at the top level
    and inside ``rope_parameters``: a ConfigError naming the field, nothing else escapes."""
    from edgelora.errors import ConfigError
    from edgelora.weights.architectures import args_from_hf_config
    from edgelora.weights.families.base import _FIELD_TYPES

    args_from_hf_config(dict(_LLAMA), "config.json")  # the base case is accepted
    cases = 0
    for field, kind in _FIELD_TYPES.items():
        if field == "model_type":
            continue  # (find_architecture's own check; tested above)
        for value in _wrong_values(kind):
            for cfg, name in (
                ({**_LLAMA, field: value}, field),
                ({**_LLAMA, "rope_parameters": {field: value}}, f"rope_parameters.{field}"),
            ):
                with pytest.raises(ConfigError, match=f"{name} must be"):
                    args_from_hf_config(cfg, "config.json")
                cases += 1
    assert cases > 150, cases


@pytest.mark.parametrize(
    "change",
    [
        {"layer_types": 0.0},  # the finding
        {"layer_types": [1, 2]},
        {"rope_parameters": 3},
        {"rope_parameters": {"full_attention": {"rope_theta": "x"}}},
        {"max_position_embeddings": 10**400},
        {"num_attention_heads": 0},
    ],
)
def test_config_values_out_of_type_or_range(change):
    """As an export reads them: the fields, the model arguments, the memory it would need."""
    from edgelora.errors import EdgeLoraError
    from edgelora.export.memory import check_memory
    from edgelora.models.args import ModelArgs
    from edgelora.weights.architectures import args_from_hf_config

    with pytest.raises(EdgeLoraError):
        check_memory(ModelArgs.from_dict(args_from_hf_config({**_LLAMA, **change}, "config.json")))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_constants_are_refused(constant, tmp_path):
    from edgelora._jsonfile import read_json
    from edgelora.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text(f'{{"rope_theta": {constant}}}')
    with pytest.raises(ConfigError, match="not a readable JSON file"):
        read_json(path, ConfigError, "config")


def test_a_tokenizer_the_rust_library_panics_on(tmp_path):
    """The minimized finding: one merge whose result is not in the vocabulary, with a
    multi-byte character in it. ``tokenizers`` panics; we give one ProgramError."""
    from tokenizers import Tokenizer

    from edgelora.runtime.chat import load_tokenizer

    model = {"type": "BPE", "unk_token": "<unk>", "vocab": {"\u0120back": 0, "wards": 1}}
    model["merges"] = [["\u0120back", "wards"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": model}))
    try:  # (the premise: the library itself does not raise an Exception)
        Tokenizer.from_file(str(path))
        premise = "loaded"
    except Exception:  # noqa: BLE001
        premise = "an Exception"
    except BaseException:  # noqa: BLE001
        premise = "a panic"
    assert premise == "a panic"
    with pytest.raises(ProgramError, match="cannot read the tokenizer"):
        load_tokenizer(path)
