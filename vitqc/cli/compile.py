"""``vitqc compile MODEL --pipeline NAME --calib SPEC``: the command over :func:`vitqc.compile`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

import vitqc
from vitqc import distributed
from vitqc.cli import render
from vitqc.cli.options import (Channels, Checkpoint, CropPct, ImgSize, Interp, Mean, ModelKwargs, Pretrained, Seed,
                               Std, model_options, preprocess_from_flags)
from vitqc.compiler import default_artifact_path
from vitqc.console import out

CALIB_HELP = ("images:DIR (a vitqc generate cache too), or a data-free source: inversion, noise, prompts, "
              "learned-prompts[:FILE] (256 images unless --calib-size; KIND:key=value,... sets options); `vitqc "
              "sources` lists them. The demo model defaults to its own train split")


def compile_command(
    model: Annotated[str, typer.Argument(help="demo | timm:NAME | hf:DIR_OR_ID | model.pt | program.pt2 | file.py:factory")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="built-in name (vitqc pipelines) or TOML path")],
    calib: Annotated[Optional[str], typer.Option("--calib", help=CALIB_HELP)] = None,
    calib_size: Annotated[Optional[int], typer.Option("--calib-size", help="number of calibration images (default: all, or 256 generated)")] = None,
    holdout: Annotated[Optional[int], typer.Option("--holdout", help="images drawn besides the calibration ones, for honest measurements (default: a tenth, 8 to 256; 0 without --eval-data)")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="artifact path (default: <model>-<pipeline>.vitqc)")] = None,
    seed: Seed = 0,
    set_: Annotated[list[str], typer.Option("--set", help="PASS.OPTION=VALUE, repeatable (e.g. calibrate.method=mse)")] = [],
    dump_graphs: Annotated[Optional[Path], typer.Option("--dump-graphs", help="write each pass's graph to DIR")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="ImageFolder to measure FP vs quantized top-1 and SQNR on")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="evaluate on N images spread over classes")] = None,
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="class names, one per line (for --calib prompts / learned-prompts)")] = None,
    diffusion: Annotated[Optional[str], typer.Option("--diffusion", help="SD-Turbo hub id or local diffusers folder (default stabilityai/sd-turbo)")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="checkpoints of long passes (default: <out>.work)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoints in --work-dir")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto (cuda when available)")] = "auto",
    report: Annotated[Optional[Path], typer.Option("--report", help="also write the HTML report (plots) to DIR")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="a weight or attention matmul vitqc does not recognise is an error, not a warning")] = False,
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Quantize MODEL with a pipeline and write one artifact (.vitqc)."""
    target = out_path or default_artifact_path(model, pipeline)
    work = work_dir or target.with_name(target.name + ".work")
    result = vitqc.compile(
        model, pipeline, calib, preprocess=preprocess_from_flags(img_size, mean, std, interpolation, crop_pct, channels),
        calib_size=calib_size, holdout=holdout, eval_data=eval_data, eval_limit=eval_limit, out=target, seed=seed,
        set=set_, device=device, work_dir=work, resume=resume, dump_graphs=dump_graphs, class_names=class_names,
        diffusion=diffusion, measure=True, strict=strict, **model_options(model_kwargs, checkpoint, pretrained))
    if not distributed.is_main():
        return  # under torchrun rank 0 alone writes and prints
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only for resuming an unfinished compile
    m = result.measurement
    out.print(render.layer_table(result.layers.to_list(), m["sqnr_db"], f"per-layer SQNR on {m['data']}"))
    for line in render.measurement_lines(m, result.pipeline.name) + ([f"report: {vitqc.report(result.path, report)}"]
                                                                      if report is not None else []):
        out.print(line, highlight=False)
    out.print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB) in {result.seconds:.1f}s", highlight=False)
