"""The compiled artifact: one zip file that loads without the model's Python class and without pickle.

    model.vitqc
    ├── manifest.json    model source, pipeline with every option, package versions, layers, measurements
    ├── quantized.pt2    torch.export program of the materialized graph (integer weight codes + scales)
    └── reference.pt2    torch.export program of the FP graph (for agreement/SQNR without the original model)

``torch.export.load`` reads programs from its own serialized format (no code is unpickled). Files are
written to a temporary file beside the target and renamed, so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitqc.errors import VitqcError

FORMAT = "vitqc-artifact/1"
__all__ = ["Artifact", "export_program", "save_artifact", "load_artifact", "check_writable", "package_versions"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("vitqc", "torch", "timm", "torchao", "executorch"):
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


def check_writable(path: str | Path) -> Path:
    """Fail early (before any long work) when the output cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise VitqcError(f"output path {str(path)!r} is a directory; give a file name such as model.vitqc")
    if not parent.exists():
        raise VitqcError(f"output directory {str(parent)!r} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise VitqcError(f"output directory {str(parent)!r} is not writable; choose another --out")
    return path


def _program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def save_artifact(path: str | Path, quantized: torch.export.ExportedProgram,
                  reference: torch.export.ExportedProgram | None, manifest: dict[str, Any]) -> Path:
    path = check_writable(path)
    manifest = {"format": FORMAT, **manifest}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=False))
            zf.writestr("quantized.pt2", _program_bytes(quantized))
            if reference is not None:
                zf.writestr("reference.pt2", _program_bytes(reference))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    quantized_program: torch.export.ExportedProgram
    reference_program: torch.export.ExportedProgram | None

    @property
    def quantized(self) -> nn.Module:
        """The quantized model as a callable module (``artifact.quantized(images)`` -> logits)."""
        return self.quantized_program.module()

    @property
    def reference(self) -> nn.Module | None:
        return None if self.reference_program is None else self.reference_program.module()

    @property
    def layer_paths(self) -> list[str]:
        return [layer["path"] for layer in self.manifest.get("layers", []) if layer.get("kind") in ("QuantLinear", "QuantConv2d")]


def is_artifact(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return "manifest.json" in zf.namelist() and "quantized.pt2" in zf.namelist()


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise VitqcError(f"artifact {str(path)!r} not found; produce one with `vitqc compile`")
    try:
        with zipfile.ZipFile(path) as zf:
            manifest = json.loads(zf.read("manifest.json"))
            quantized = torch.export.load(io.BytesIO(zf.read("quantized.pt2")))
            reference = (torch.export.load(io.BytesIO(zf.read("reference.pt2")))
                         if "reference.pt2" in zf.namelist() else None)
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, RuntimeError) as exc:
        raise VitqcError(f"{str(path)!r} is not a readable vitqc artifact ({type(exc).__name__}); recompile it") from None
    if manifest.get("format") != FORMAT:
        raise VitqcError(f"{str(path)!r} has format {manifest.get('format')!r}, this vitqc reads {FORMAT!r}")
    return Artifact(path, manifest, quantized, reference)
