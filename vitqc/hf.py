"""HuggingFace transformers image models as vitqc inputs (``hf:DIR_OR_ID``).

:func:`load_hf` reads a ``save_pretrained`` directory (offline) or a hub id (online): the class named in its
``config.json`` (``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``, ...),
any ``from_pretrained`` keyword such as ``attn_implementation`` from the model kwargs, and the preprocessing
from its ``preprocessor_config.json`` (:func:`preprocess_config`).

:class:`HFImageModel` adapts the model to what vitqc expects of an image model: ``forward(images) -> one
tensor``. transformers' forward takes ``pixel_values=``, returns an output dataclass (or a tuple, by
``return_dict`` and its ``can_return_tuple`` wrapper); the adapter returns ``logits`` (a DeiT with a
distillation head: the mean of both heads, as transformers defines it), or for a backbone its
``pooler_output`` when it has one, else ``last_hidden_state``. The adapter registers the model's own children
(not the model under a prefix), so module paths are transformers' own: ``vit.encoder.layer.0.attention...``.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitqc.errors import VitqcError

__all__ = ["HFImageModel", "is_hf_model", "load_hf", "preprocess_config", "OUTPUTS"]

OUTPUTS = ("logits", "pooler_output", "last_hidden_state")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_VISION_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher", "Model")


def is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


class HFImageModel(nn.Module):
    """``images -> tensor`` around a transformers image model (see the module docstring)."""

    def __init__(self, model: nn.Module, output: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "hf_model", model)  # not a child: paths stay transformers' own
        for name, child in model.named_children():
            self.add_module(name, child)
        self.output = output or self._default_output(model)
        if self.output not in OUTPUTS:
            raise VitqcError(f"HF output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        self.config = model.config

    @staticmethod
    def _default_output(model: nn.Module) -> str:
        """logits for a classifier; for a backbone its pooled output when it computes one (a ``pooler`` that is
        not switched off, or, without a pooler attribute, an output class with ``pooler_output``: DINOv2's
        layer-normed class token), else last_hidden_state."""
        if "ForImageClassification" in type(model).__name__:
            return "logits"
        if hasattr(model, "pooler"):
            return "pooler_output" if model.pooler is not None else "last_hidden_state"
        returns = inspect.signature(type(model).forward).return_annotation
        fields = getattr(returns, "__dataclass_fields__", {})
        return "pooler_output" if "pooler_output" in fields else "last_hidden_state"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.hf_model(pixel_values=pixel_values, return_dict=True)
        value = getattr(out, self.output, None)
        if value is None:
            raise VitqcError(f"{type(self.hf_model).__name__} returned no {self.output}")
        return value

    def train(self, mode: bool = True) -> "HFImageModel":
        super().train(mode)
        self.hf_model.train(mode)
        return self


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VitqcError(f"could not read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise VitqcError(f"{path} is not a JSON object")
    return data


def preprocess_config(processor: dict[str, Any], channels: int = 3, where: str = "preprocessor_config.json") -> dict[str, Any]:
    """An image processor's config as a timm-style data config (what :class:`vitqc.data.Preprocess` reads).

    ``size`` {height, width} resizes to exactly that size (timm's ``squash`` crop mode), {shortest_edge} keeps
    the aspect ratio (``center``); ``crop_size`` with ``do_center_crop`` then crops the centre.
    """
    def hw(value: Any, what: str) -> tuple[int, int] | None:
        if isinstance(value, int):
            return value, value
        if isinstance(value, dict) and "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        return None

    if not processor.get("do_resize", True):
        raise VitqcError(f"{where}: do_resize is false, so the model takes images of any size; give the size "
                         f"vitqc should use with --img-size (and --mean/--std)")
    if processor.get("do_rescale", True) and not math.isclose(float(processor.get("rescale_factor", 1 / 255)),
                                                               1 / 255, rel_tol=1e-6):
        raise VitqcError(f"{where}: rescale_factor {processor.get('rescale_factor')} is not 1/255; vitqc reads "
                         f"pixels as [0, 1]: give --mean/--std that include the factor")
    size = processor.get("size")
    crop = hw(processor.get("crop_size"), "crop_size") if processor.get("do_center_crop") else None
    mode = "squash"
    resize = hw(size, "size")
    if resize is None and isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if crop is None:
            raise VitqcError(f"{where}: size {size} without a centre crop gives inputs of varying shape; give "
                             f"--img-size")
        resize, mode = (edge, edge), "center"
    if resize is None:
        raise VitqcError(f"{where}: size {size!r} is not understood (expected {{height, width}} or "
                         f"{{shortest_edge}}); give --img-size")
    out_h, out_w = crop or resize
    crop_pct = out_h / resize[0]
    if not math.isclose(out_w / resize[1], crop_pct, rel_tol=1e-6) or crop_pct > 1:
        raise VitqcError(f"{where}: crop {crop} of a {resize} resize is not one centre-crop fraction; give "
                         f"--img-size and --crop-pct")
    # timm resizes to floor(size / crop_pct): keep that equal to the processor's resize
    while math.floor(out_h / crop_pct) < resize[0]:
        crop_pct = math.nextafter(crop_pct, 0.0)
    mean = processor.get("image_mean", [0.5] * channels) if processor.get("do_normalize", True) else [0.0] * channels
    std = processor.get("image_std", [0.5] * channels) if processor.get("do_normalize", True) else [1.0] * channels
    resample = processor.get("resample", 2)
    interpolation = _RESAMPLE.get(int(resample), None) if isinstance(resample, (int, float)) else None
    if interpolation is None:
        raise VitqcError(f"{where}: resample {resample!r} is not a PIL filter number")
    return {"input_size": (channels, out_h, out_w), "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std), "interpolation": interpolation, "crop_pct": crop_pct,
            "crop_mode": mode}


def _model_class(config: dict[str, Any], where: str) -> type:
    import transformers

    names = config.get("architectures") or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None and name.endswith(_VISION_SUFFIXES):
            return cls
    if names:
        raise VitqcError(f"{where}: architecture {names[0]} is not a transformers image classifier or backbone "
                         f"this version knows ({transformers.__version__})")
    raise VitqcError(f"{where} names no architecture (config.json 'architectures'); save the model with "
                     f"save_pretrained")


def load_hf(spec: str, kwargs: dict[str, Any]) -> tuple[HFImageModel, dict[str, Any], dict[str, Any] | None]:
    """``hf:DIR_OR_ID`` -> (adapter, JSON-able source record, timm-style data config or None)."""
    from vitqc.models import _first_line, _is_network_error

    if not spec:
        raise VitqcError("empty HuggingFace model: write hf:DIR (a save_pretrained directory) or hf:ORG/NAME")
    kwargs = dict(kwargs)
    output = kwargs.pop("output", None)
    local = Path(spec).expanduser()
    source: dict[str, Any] = {"form": "hf", "name": spec}
    if local.is_dir():
        config = _read_json(local / "config.json") if (local / "config.json").is_file() else None
        if config is None:
            raise VitqcError(f"{spec} has no config.json: give a directory written by save_pretrained")
        cls = _model_class(config, str(local / "config.json"))
        where = str(local.resolve())
        source["path"] = where
        load_from, load_kw = str(local), {"local_files_only": True}
    else:
        import transformers

        try:
            config_obj = transformers.AutoConfig.from_pretrained(spec)
        except Exception as e:
            if _is_network_error(e):
                raise VitqcError(f"could not download hf:{spec} (offline?); give a save_pretrained directory: "
                                 f"hf:DIR") from None
            raise VitqcError(f"hf:{spec} is neither a directory nor a hub model: {_first_line(e)}") from None
        config = config_obj.to_dict()
        cls = _model_class(config, f"hf:{spec}")
        load_from, load_kw = spec, {}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # vitqc's own output stays one line per step
    try:
        model = cls.from_pretrained(load_from, **load_kw, **kwargs)
    except TypeError as e:
        raise VitqcError(f"hf:{spec} does not accept these model kwargs {sorted(kwargs)}: {_first_line(e)}") from None
    except Exception as e:
        if _is_network_error(e):
            raise VitqcError(f"could not download hf:{spec} (offline?); give a save_pretrained directory") from None
        raise VitqcError(f"could not load hf:{spec} with {cls.__name__}.from_pretrained: {_first_line(e)}") from None
    model.eval()
    adapter = HFImageModel(model, output)
    source.update(architecture=cls.__name__, output=adapter.output,
                  attn_implementation=getattr(model.config, "_attn_implementation", None))
    data_config = None
    channels = int(config.get("num_channels", 3))
    processor_file = local / "preprocessor_config.json" if local.is_dir() else None
    if processor_file is not None and processor_file.is_file():
        data_config = preprocess_config(_read_json(processor_file), channels, str(processor_file))
    elif processor_file is None:
        try:
            import transformers

            processor = transformers.AutoImageProcessor.from_pretrained(spec)
            data_config = preprocess_config(processor.to_dict(), channels, f"hf:{spec} image processor")
        except VitqcError:
            raise
        except Exception:  # no processor on the hub: the CLI asks for --img-size
            data_config = None
    return adapter, source, data_config
