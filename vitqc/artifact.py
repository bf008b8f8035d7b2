"""The compiled artifact: one zip file that loads without the model's Python class and without running code.

    model.vitqc
    ├── manifest.json                    model source, pipeline with every option, package versions, layers,
    │                                    coverage, measurements (checked against a schema on load)
    ├── quantized/program.json           torch.export program of the materialized graph (JSON)
    ├── quantized/weights.safetensors    its tensors: integer weight codes + scales
    ├── reference/program.json           the FP program (agreement and SQNR without the original model)
    └── reference/weights.safetensors

Nothing in the file is unpickled or executed: programs are checked before torch deserializes them
(:mod:`vitqc.archive`). Files are written to a temporary file beside the target and renamed.
"""
from __future__ import annotations

import json
import platform
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitqc.archive import PROGRAM_JSON, member_reader, open_archive, program_members, read_manifest, read_program, write_archive
from vitqc.errors import VitqcError

MANIFEST = "manifest.json"

FORMAT = "vitqc-artifact/2"
__all__ = ["Artifact", "export_program", "save_artifact", "load_artifact", "package_versions", "identify",
           "FORMAT", "MANIFEST"]

# key -> (type, what it holds); checked on load so a broken manifest is one line, not a KeyError later
_REQUIRED: dict[str, tuple[type, str]] = {
    "format": (str, "the format tag"),
    "model": (dict, "where the model came from"),
    "pipeline": (dict, "the pipeline"),
    "seed": (int, "the seed"),
    "calibration": (dict, "the calibration record"),
    "preprocess": (dict, "the preprocessing"),
    "input_shape": (list, "the input shape"),
    "layers": (list, "the layer table"),
    "summary": (dict, "the measurements"),
    "versions": (dict, "package versions"),
}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("vitqc", "torch", "timm", "transformers", "torchao", "executorch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension (any batch size runs, batch 1 included)."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # Trace with two images: a batch of one would be specialised to the constant 1 (0/1 specialisation).
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # export failures are bugs or unsupported graphs; name the cause in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitqcError(f"could not export the quantized graph with torch.export: {first}") from exc


def _check_tables(manifest: dict[str, Any], broken: str) -> None:
    from vitqc.data import Preprocess

    if not isinstance(manifest["pipeline"].get("name"), str):
        raise VitqcError(f"{broken}: its manifest names no pipeline; recompile it")
    shape = manifest["input_shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise VitqcError(f"{broken}: its input shape {shape!r} is not three positive integers; recompile it")
    for layer in manifest["layers"]:
        if not (isinstance(layer, dict) and isinstance(layer.get("path"), str) and isinstance(layer.get("kind"), str)):
            raise VitqcError(f"{broken}: its layer table has an entry without a path and kind; recompile it")
    try:
        Preprocess.from_dict(manifest["preprocess"])
    except (VitqcError, TypeError, ValueError) as exc:
        raise VitqcError(f"{broken}: its preprocessing is invalid ({exc}); recompile it") from None


def save_artifact(path: str | Path, quantized: torch.export.ExportedProgram,
                  reference: torch.export.ExportedProgram | None, manifest: dict[str, Any],
                  extra: dict[str, bytes] | None = None) -> Path:
    """Write an artifact (see the module docstring); ``manifest`` gets the format tag. ``extra`` members (the
    report's calibration preview) are stored as they are."""
    members = {MANIFEST: json.dumps({"format": FORMAT, **manifest}, indent=2).encode()}
    members.update(program_members(quantized, "quantized"))
    if reference is not None:
        members.update(program_members(reference, "reference"))
    members.update(extra or {})
    return write_archive(path, members, what="artifact")


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    quantized_program: torch.export.ExportedProgram
    reference_program: torch.export.ExportedProgram | None

    @property
    def quantized(self) -> nn.Module:
        """The quantized model as a callable module (``artifact.quantized(images)`` -> logits); its GELUs run as
        :func:`~vitqc.quant.rational_gelu.rational_gelu_fast` (the program's values, faster in PyTorch)."""
        from vitqc.quant.rational_gelu import fast_rational_gelus

        return fast_rational_gelus(self.quantized_program.module())

    @property
    def reference(self) -> nn.Module | None:
        return None if self.reference_program is None else self.reference_program.module()

    @property
    def layer_paths(self) -> list[str]:
        """Paths of the weight layers (linear, conv) in the layer table, in graph order."""
        return [layer["path"] for layer in self.manifest["layers"] if layer.get("weight_bits") is not None]

    @property
    def preprocess(self):
        """How an image file becomes this model's input (a :class:`vitqc.data.Preprocess`)."""
        from vitqc.data import Preprocess

        return Preprocess.from_dict(self.manifest["preprocess"])


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact; a broken or hostile one is refused in one line (nothing in it runs)."""
    path = Path(path)
    where = repr(str(path))
    with open_archive(path, "artifact") as zf:
        manifest = read_manifest(zf, where, FORMAT, _REQUIRED)
        _check_tables(manifest, f"{where} is a broken vitqc file")
        read = member_reader(zf, where)
        quantized = read_program(read, "quantized", where)
        reference = read_program(read, "reference", where) if "reference/program.json" in zf.namelist() else None
    return Artifact(path, manifest, quantized, reference)


def identify(path: str | Path) -> str | None:
    """What a file is, by its content: ``artifact``, ``packed`` (a packed export), ``pte`` (ExecuTorch),
    ``pt2`` (a torch.export archive), ``vitqc`` (a vitqc zip too broken to tell more: truncated, or its
    manifest unreadable), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(30 + len(MANIFEST))
    except OSError:
        return None
    if len(head) >= 6 and head[4:6] == b"ET":
        return "pte"
    # vitqc writes manifest.json as the first member: a zip local header naming it marks a vitqc file even
    # when the archive's end (its directory) was cut off
    starts_vitqc = head[:4] == b"PK\x03\x04" and head[30:] == MANIFEST.encode() and head[26:28] == b"\x0d\x00"
    if not zipfile.is_zipfile(path):
        return "vitqc" if starts_vitqc else None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if MANIFEST in names:
                fmt = json.loads(zf.read(MANIFEST)).get("format", "")
                return {"vitqc-artifact": "artifact", "vitqc-packed": "packed"}.get(str(fmt).split("/")[0], "vitqc")
            if any(n.endswith(("archive_format", "serialized_exported_program.json")) for n in names):
                return "pt2"
            if any(n.endswith("/" + PROGRAM_JSON) for n in names):
                return "vitqc"  # a vitqc archive that lost its manifest
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError):
        return "vitqc"
    return "vitqc" if starts_vitqc else None
