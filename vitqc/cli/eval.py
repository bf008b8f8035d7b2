"""``vitqc eval TARGET --data DIR``: the command over :func:`vitqc.evaluate.evaluate`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitqc.cli.options import (Channels, Checkpoint, CropPct, ImgSize, Interp, Mean, ModelKwargs, Pretrained, Std,
                               model_options, preprocess_from_flags)


def eval_command(
    model: Annotated[str, typer.Argument(help="an artifact (.vitqc), a packed export, or any model form that compile takes")],
    data: Annotated[Path, typer.Option("--data", help="ImageFolder directory with class subfolders")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="N images spread over classes")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Top-1 of a model; for an artifact also agreement with its FP model and a per-layer SQNR table."""
    from vitqc.artifact import load_artifact
    from vitqc.cli import render
    from vitqc.console import out
    from vitqc.evaluate import evaluate

    result = evaluate(model, data, limit=limit, batch_size=batch_size,
                      preprocess=preprocess_from_flags(img_size, mean, std, interpolation, crop_pct, channels),
                      **{k: v for k, v in model_options(model_kwargs, checkpoint, pretrained).items() if v})
    if as_json:
        print(json.dumps(result, indent=2))
    elif "sqnr_db" in result:
        layers = load_artifact(model).manifest["layers"]
        out.print(render.layer_table(layers, result["sqnr_db"], f"per-layer SQNR ({result['images']} images)"))
        out.print(f"top-1: FP {result['reference_top1']:.2%}  quantized ({result['pipeline']}) "
                  f"{result['quantized_top1']:.2%}  agreement {result['agreement']:.2%}  on {result['images']} images",
                  highlight=False)
    else:
        key = "quantized_top1" if "quantized_top1" in result else "top1"
        out.print(f"top-1: {'quantized ' if key != 'top1' else ''}{result[key]:.2%} on {result['images']} images",
                  highlight=False)
