"""vitqc's files: zip archives of JSON and safetensors, written atomically and read without running their code.

A ``torch.export`` program is stored as two members of an archive::

    <prefix>/program.json          torch.export's serialized program (its schema JSON), debugging metadata dropped
    <prefix>/weights.safetensors   its parameters, buffers and tensor constants

``torch.export.load`` is never called on a file: it unpickles (sample inputs, weights marked ``use_pickle``),
``exec``s the program's guard code, and resolves any ``torch.*`` attribute chain named as a node target
(``torch.serialization.os.system`` among them) into a call. :func:`read_program` checks the JSON first and
refuses, in one line, a program that would do any of that: every node must call an aten operator (or one of a
few Python operators on sizes), every symbolic expression may use only sympy's integer-arithmetic names, and
there may be no guard code, custom objects, subgraphs or operator arguments. Only then does torch's own
deserializer see the JSON, with the tensors read from safetensors (which holds raw tensor bytes, nothing more).

:func:`write_archive` writes through a temporary file beside the target and renames it into place: nothing
half-written is left behind, an existing non-regular target (a device, a FIFO) is refused, the file gets the
user's umask, and a failed write (a full disk) is one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import torch

from vitqc.errors import VitqcError

__all__ = ["program_members", "read_program", "write_archive", "write_bytes", "atomic_output", "check_output_path", "check_free_space",
           "open_archive", "member_reader", "read_manifest", "check_manifest", "UnsafeProgram", "PROGRAM_JSON",
           "PROGRAM_WEIGHTS"]

PROGRAM_JSON = "program.json"
PROGRAM_WEIGHTS = "weights.safetensors"

# Node metadata a loaded program keeps: evaluate.LayerTaps and the backends find layers by nn_module_stack.
# The rest (stack traces, torch_fn, source_fn_stack, from_node) is debugging data, and source_fn_stack would
# make torch resolve arbitrary names when read.
_KEPT_METADATA = ("nn_module_stack",)

# Python-level operators torch.export emits for size arithmetic (a dynamic batch dimension).
_SIZE_OPERATORS = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
    "_operator.truediv", "_operator.mod", "_operator.neg", "_operator.pow", "_operator.eq", "_operator.ne",
    "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge", "torch.sym_float", "torch.sym_int",
    "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sqrt", "math.ceil", "math.floor", "math.trunc",
})
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_REFUSED_ATEN = frozenset({"from_file"})  # reads any file on the machine into a tensor

# Symbolic sizes are written in sympy's srepr form, e.g. Mul(Integer(17), Symbol('s77', positive=True)), and
# torch parses them with sympify (an eval). Only these names may appear, with numbers, quoted symbol names and
# ( ) , = + - * / and spaces.
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Mul", "Add", "Pow", "Mod", "PythonMod", "FloorDiv", "CleanDiv",
    "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "Max", "Min",
    "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "ToFloat", "positive", "negative", "integer",
    "nonnegative", "nonpositive", "real", "finite", "True", "False", "true", "false", "oo", "zoo",
})
_SYMPY_TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|'[A-Za-z_][A-Za-z0-9_]*'|\d+(?:\.\d+)?(?:e[+-]?\d+)?|[(),=+\-*/]")
_SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UnsafeProgram(VitqcError):
    """A stored program asks for something a vitqc program never does (code, files, custom objects)."""


# ------------------------------------------------------------------------------------------------ programs
def program_members(program: torch.export.ExportedProgram, prefix: str) -> dict[str, bytes]:
    """The archive members that store ``program`` under ``prefix/`` (JSON + safetensors, no pickle)."""
    from safetensors.torch import save as save_safetensors
    from torch._export.serde.serialize import serialize

    tensors: dict[str, torch.Tensor] = {}
    for kind, table in (("state_dict", program.state_dict), ("constants", program.constants)):
        for name, value in table.items():
            if not isinstance(value, torch.Tensor):
                raise VitqcError(f"the program holds a {type(value).__name__} constant {name!r}; vitqc stores "
                                 f"tensors only (a custom object would need pickle to load)")
            # clone: safetensors refuses tensors that share memory (tied weights)
            tensors[f"{kind}/{name}"] = value.detach().to("cpu").contiguous().clone()
    serialized = serialize(program, serialize_state_dict=False, serialize_constants=False,
                           serialize_example_inputs=False)
    data = json.loads(serialized.exported_program)
    for node in data["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {k: v for k, v in node.get("metadata", {}).items() if k in _KEPT_METADATA}
    return {f"{prefix}/{PROGRAM_JSON}": json.dumps(data, separators=(",", ":")).encode(),
            f"{prefix}/{PROGRAM_WEIGHTS}": save_safetensors(tensors)}


def _check_sympy(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise UnsafeProgram(f"{where}: a symbolic size is not text")
    pos = 0
    for match in _SYMPY_TOKEN.finditer(text):
        if match.start() != pos:
            break
        token = match.group()
        if _SYMBOL_NAME.fullmatch(token) and token not in _SYMPY_NAMES:
            raise UnsafeProgram(f"{where}: a symbolic size uses the name {token!r}, which no size expression needs")
        pos = match.end()
    if pos != len(text):
        raise UnsafeProgram(f"{where}: a symbolic size holds {text[pos:pos + 20]!r}, which no size expression needs")


def _check_target(target: Any, where: str) -> None:
    if not isinstance(target, str):
        raise UnsafeProgram(f"{where}: a node's target is not text")
    if target in _SIZE_OPERATORS:
        return
    match = _ATEN_TARGET.fullmatch(target)
    if match is None:
        raise UnsafeProgram(f"{where}: a node calls {target!r}; vitqc programs call aten operators only")
    name, overload = match.groups()
    if name in _REFUSED_ATEN:
        raise UnsafeProgram(f"{where}: a node calls {target!r}, which reads files")
    # aten's own dunder ops (__and__, __lshift__) are packets; Python's attributes (__class__) are not
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if not isinstance(op, torch._ops.OpOverload):
        raise UnsafeProgram(f"{where}: a node calls {target!r}, which is not an aten operator of this torch")


def _check_json(data: Any, where: str) -> None:
    """Walk the serialized program: refuse what a vitqc program never holds (see the module docstring)."""
    if not isinstance(data, dict) or not isinstance(data.get("graph_module"), dict):
        raise UnsafeProgram(f"{where}: not a serialized torch.export program")
    if data.get("guards_code"):
        raise UnsafeProgram(f"{where}: the program carries guard code (Python that torch would exec)")
    graph = data["graph_module"].get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list):
        raise UnsafeProgram(f"{where}: the program has no node list")
    for node in nodes:
        if not isinstance(node, dict):
            raise UnsafeProgram(f"{where}: a node is not an object")
        _check_target(node.get("target"), where)
        meta = node.get("metadata", {})
        if not isinstance(meta, dict):
            raise UnsafeProgram(f"{where}: a node's metadata is not an object")
        node["metadata"] = {k: v for k, v in meta.items() if k in _KEPT_METADATA and isinstance(v, str)}
    ranges = data.get("range_constraints", {})
    if not isinstance(ranges, dict) or not all(isinstance(k, str) and _SYMBOL_NAME.fullmatch(k) for k in ranges):
        raise UnsafeProgram(f"{where}: the program's size ranges are malformed")

    refused = {"as_custom_obj": "a custom object", "as_custom_objs": "custom objects", "custom_obj": "a custom object",
               "as_graph": "a subgraph", "as_operator": "an operator argument"}
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in refused and value is not None:
                    raise UnsafeProgram(f"{where}: the program holds {refused[key]}, which vitqc never stores")
                if key == "expr_str":
                    _check_sympy(value, where)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def read_program(read: Callable[[str], bytes], prefix: str, where: str) -> torch.export.ExportedProgram:
    """Load the program stored under ``prefix/`` (``read(member) -> bytes``), checked before torch sees it.

    ``where`` names the file in error messages. Raises :class:`UnsafeProgram` for a program that would run
    code or read files, :class:`VitqcError` for one that is broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        data = json.loads(read(f"{prefix}/{PROGRAM_JSON}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitqcError(f"{where}: {prefix}/{PROGRAM_JSON} is not JSON ({type(exc).__name__})") from None
    _check_json(data, where)
    try:
        tensors = load_safetensors(read(f"{prefix}/{PROGRAM_WEIGHTS}"))
    except (SafetensorError, ValueError) as exc:
        raise VitqcError(f"{where}: {prefix}/{PROGRAM_WEIGHTS} is not a safetensors file ({exc})") from None
    state_dict = {k.removeprefix("state_dict/"): v for k, v in tensors.items() if k.startswith("state_dict/")}
    constants = {k.removeprefix("constants/"): v for k, v in tensors.items() if k.startswith("constants/")}
    params = {spec["parameter"]["parameter_name"] for spec in
              data["graph_module"].get("signature", {}).get("input_specs", [])
              if isinstance(spec, dict) and isinstance(spec.get("parameter"), dict)}
    state_dict = {k: torch.nn.Parameter(v, requires_grad=False) if k in params else v for k, v in state_dict.items()}
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, data)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except UnsafeProgram:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means a broken or foreign program
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VitqcError(f"{where}: the program under {prefix}/ cannot be read by this torch "
                         f"({type(exc).__name__}: {first})") from None


# ------------------------------------------------------------------------------------------------ writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | Path, what: str = "output") -> Path:
    """Fail early, before any long work, when ``path`` cannot take a new file: a directory, an existing
    non-regular file (device, FIFO, socket), a missing or unwritable directory (checked by creating and
    removing a file there, which also catches read-only and pseudo file systems)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise VitqcError(f"{what} {str(path)!r} is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise VitqcError(f"{what} {str(path)!r} exists and is not a regular file (a device or a pipe); "
                         f"choose another path")
    if not parent.is_dir():
        raise VitqcError(f"{what} directory {str(parent)!r} does not exist; create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise VitqcError(f"{what} directory {str(parent)!r} is not writable ({exc.strerror or exc}); "
                         f"choose another path") from None
    return path


def check_free_space(path: str | Path, needed_bytes: int, what: str = "output") -> None:
    """Refuse, before the long work, when ``path``'s file system has less room than ``needed_bytes``."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return  # nothing to measure (the write itself still fails in one line)
    if free < needed_bytes:
        raise VitqcError(f"{what} {str(path)!r} needs about {needed_bytes / 1e6:.0f} MB but {str(parent)!r} has "
                         f"{free / 1e6:.0f} MB free; free room or choose another path")


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str = "output") -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` when the block ends without error (temporary file beside it, then a
    rename), with the user's umask; on any error the temporary file is removed and ``path`` is untouched. An
    OSError while writing (a full disk) becomes one line."""
    path = check_output_path(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            yield raw
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the user's umask
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise VitqcError(f"could not write {what} {str(path)!r}: {reason}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_archive(path: str | Path, members: Mapping[str, bytes], what: str = "output") -> Path:
    """Write ``members`` as a zip (stored, not compressed) to ``path``, atomically (:func:`atomic_output`)."""
    with atomic_output(path, what) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path``, atomically (:func:`atomic_output`)."""
    with atomic_output(path, what) as raw:
        raw.write(data)
    return Path(path)


# ------------------------------------------------------------------------------------------------ reading
def open_archive(path: Path, what: str) -> zipfile.ZipFile:
    """The zip at ``path``; a missing, non-regular or truncated file is one line."""
    if not path.exists():
        raise VitqcError(f"{what} {str(path)!r} not found")
    if not path.is_file():
        raise VitqcError(f"{what} {str(path)!r} is not a regular file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VitqcError(f"{str(path)!r} is a broken vitqc file: not a complete zip archive (truncated or not "
                         f"written by vitqc: {exc}); recompile it") from None


def member_reader(zf: zipfile.ZipFile, where: str) -> Callable[[str], bytes]:
    """``read(name) -> bytes`` for the archive's members; a missing or unreadable member is one line."""
    names = set(zf.namelist())

    def read(name: str) -> bytes:
        if name not in names:
            raise VitqcError(f"{where} is a broken vitqc file: it lacks {name}; recompile it")
        try:
            return zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as exc:
            raise VitqcError(f"{where} is a broken vitqc file: {name} cannot be read ({exc}); recompile it") from None

    return read


def read_manifest(zf: zipfile.ZipFile, where: str, expected_format: str,
                  required: dict[str, tuple[type, str]]) -> dict[str, Any]:
    """``manifest.json`` of a vitqc archive, checked: the format, then each required key and its type."""
    raw = member_reader(zf, where)("manifest.json")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitqcError(f"{where} is a broken vitqc file: manifest.json is not JSON ({exc}); recompile it") from None
    return check_manifest(manifest, where, expected_format, required)


def check_manifest(manifest: Any, where: str, expected_format: str,
                   required: dict[str, tuple[type, str]]) -> dict[str, Any]:
    """The manifest if it is one this vitqc reads; else a one-line :class:`VitqcError` saying what is wrong."""
    broken = f"{where} is a broken vitqc file"
    if not isinstance(manifest, dict):
        raise VitqcError(f"{broken}: its manifest is a JSON {type(manifest).__name__}, not an object; recompile it")
    fmt = manifest.get("format")
    if fmt != expected_format:
        if isinstance(fmt, str) and fmt.split("/")[0] == expected_format.split("/")[0]:
            raise VitqcError(f"{where} has format {fmt!r}; this vitqc reads {expected_format!r} (format 1 embedded "
                             f"torch.export archives that can unpickle code): recompile it with this vitqc")
        raise VitqcError(f"{where} has format {fmt!r}, not {expected_format!r}: it is not a file this vitqc wrote")
    for key, (kind, what) in required.items():
        if key not in manifest:
            raise VitqcError(f"{broken}: its manifest lacks {key!r} ({what}); recompile it")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            raise VitqcError(f"{broken}: its manifest's {key!r} is a {type(manifest[key]).__name__}, not a "
                             f"{kind.__name__}; recompile it")
    return manifest
