"""Options several commands share (the model and its preprocessing), and turning them into library arguments."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vitqc.errors import VitqcError

ModelKwargs = Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON kwargs for timm:NAME or file.py:factory")]
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="weights (.safetensors or state dict) for timm:NAME")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="download timm's pretrained weights (needs internet)")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="input size for models without a data config")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="comma-separated channel means (models without a data config)")]
Std = Annotated[Optional[str], typer.Option("--std", help="comma-separated channel stds (models without a data config)")]
Interp = Annotated[str, typer.Option("--interpolation", help="resize interpolation (models without a data config)")]
CropPct = Annotated[float, typer.Option("--crop-pct", help="center-crop fraction (models without a data config)")]
Channels = Annotated[int, typer.Option("--channels", help="input channels (models without a data config)")]
Seed = Annotated[int, typer.Option("--seed")]


def floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VitqcError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406)") from None


def model_options(model_kwargs: str | None, checkpoint: Path | None, pretrained: bool) -> dict[str, Any]:
    """``--model-kwargs/--checkpoint/--pretrained`` as keywords of vitqc.compile / load_model_and_preprocess."""
    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else None
    except json.JSONDecodeError as e:
        raise VitqcError(f"--model-kwargs is not valid JSON ({e.msg}); e.g. --model-kwargs '{{\"num_classes\": 10}}'") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise VitqcError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return {"model_kwargs": kwargs, "checkpoint": checkpoint, "pretrained": pretrained}


def preprocess_from_flags(img_size: int | None, mean: str | None, std: str | None, interpolation: str,
                          crop_pct: float, channels: int):
    """A Preprocess when ``--img-size`` is given (it then overrides the model's own data config), else None."""
    from vitqc.data import Preprocess

    if img_size is None:
        if mean is not None or std is not None:
            raise VitqcError("--mean/--std need --img-size (they describe a model without a data config)")
        return None
    return Preprocess.from_flags(img_size=img_size, mean=floats(mean), std=floats(std), interpolation=interpolation,
                                 crop_pct=crop_pct, channels=channels)


def load_model(model: str, model_kwargs: str | None, checkpoint: Path | None, pretrained: bool, img_size: int | None,
               mean: str | None, std: str | None, interpolation: str, crop_pct: float, channels: int):
    """(LoadedModel, Preprocess) for the commands that need a model and its preprocessing."""
    from vitqc.models import load_model_and_preprocess

    explicit = preprocess_from_flags(img_size, mean, std, interpolation, crop_pct, channels)
    loaded, own = load_model_and_preprocess(model, **model_options(model_kwargs, checkpoint, pretrained))
    preprocess = explicit or own
    if preprocess is None:
        raise VitqcError(f"{model!r} carries no data config: give --img-size (and --mean/--std if it normalises)")
    return loaded, preprocess
