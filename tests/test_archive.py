"""vitqc.archive: programs are stored as JSON + safetensors and checked before torch reads them, so a hostile
file runs nothing; writes are atomic."""
import json
import os
import zipfile

import pytest
import torch

import vitqc
from tests.program_json import first_symbolic_size
from vitqc.archive import UnsafeProgram, check_output_path, program_members, read_program, write_archive


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()


@pytest.fixture(scope="module")
def members():
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Tiny().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    return program_members(program, "p")


def _program(members):
    return json.loads(members["p/program.json"])


def _with(members, data):
    return {**members, "p/program.json": json.dumps(data).encode()}


def test_round_trip_is_exact(members):
    torch.manual_seed(0)
    ref = Tiny().eval()
    torch.manual_seed(0)
    loaded = read_program(members.__getitem__, "p", "x").module()
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), ref(x))


def _marker_code(marker):
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"


def test_guard_code_is_refused_and_would_have_run(members, tmp_path):
    marker = tmp_path / "guard-ran"
    data = _program(members)
    data["guards_code"] = [f"({_marker_code(marker)}) is None"]
    hostile = _with(members, data)
    with pytest.raises(UnsafeProgram, match="guard code"):
        read_program(hostile.__getitem__, "p", "x")
    assert not marker.exists()
    # without the check torch exec()s it into the module's guard function, run with the program
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from safetensors.torch import load as load_safetensors

    tensors = load_safetensors(members["p/weights.safetensors"])
    state = {k.removeprefix("state_dict/"): torch.nn.Parameter(v, requires_grad=False) for k, v in tensors.items()}
    example = ((torch.randn(2, 4),), {})  # torch.export.load gives torch these from the file (a pickle)
    ep = ExportedProgramDeserializer().deserialize(_dict_to_dataclass(schema.ExportedProgram, data), state, {}, example)
    try:
        ep.module()(torch.randn(2, 4))  # the guards run with the program
    except Exception:  # noqa: BLE001 - the guard's value does not matter, only that it ran
        pass
    assert marker.exists()


def test_a_node_calling_python_is_refused(members, tmp_path):
    data = _program(members)
    node = next(n for n in data["graph_module"]["graph"]["nodes"] if n["target"].endswith("relu.default"))
    for target, message in (("torch.serialization.os.system", "calls 'torch.serialization.os.system'"),
                            ("builtins.eval", "aten operators only"),
                            ("torch.ops.aten.from_file.default", "reads files"),
                            ("torch.ops.aten.__class__.default", "not an aten operator"),
                            ("torch.ops.aten.no_such_op.default", "not an aten operator")):
        node["target"] = target
        with pytest.raises(UnsafeProgram, match=message):
            read_program(_with(members, data).__getitem__, "p", "x")


def test_symbolic_sizes_that_are_code_are_refused(members, tmp_path):
    marker = tmp_path / "sympy-ran"
    data = _program(members)
    text = json.dumps(data)
    assert '"expr_str"' in text
    hostile = json.loads(text)
    first_symbolic_size(hostile)["expr_str"] = _marker_code(marker)
    with pytest.raises(UnsafeProgram, match="symbolic size"):
        read_program(_with(members, hostile).__getitem__, "p", "x")
    assert not marker.exists()


def test_custom_objects_and_subgraphs_are_refused(members):
    data = _program(members)
    node = data["graph_module"]["graph"]["nodes"][0]
    node["inputs"].append({"name": "obj", "arg": {"as_custom_obj": {"name": "o", "class_fqn": "x.Y"}}})
    with pytest.raises(UnsafeProgram, match="custom object"):
        read_program(_with(members, data).__getitem__, "p", "x")


def test_output_checks(tmp_path):
    with pytest.raises(vitqc.VitqcError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(vitqc.VitqcError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "m.vitqc")
    with pytest.raises(vitqc.VitqcError, match="not a regular file"):
        check_output_path("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(vitqc.VitqcError, match="not a regular file"):
        write_archive(fifo, {"a": b"x"})
    assert fifo.exists() and not fifo.is_file()  # left as it was
    if os.path.isdir("/proc/self") and os.geteuid() == 0 or os.path.isdir("/proc/self"):
        with pytest.raises(vitqc.VitqcError, match="not writable"):
            check_output_path("/proc/self/m.vitqc")
    path = write_archive(tmp_path / "ok.zip", {"a": b"x"})
    assert zipfile.ZipFile(path).read("a") == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "ok.zip"]
