"""``vitqc generate MODEL --calib SOURCE --out DIR``: the command over :func:`vitqc.calib.spec.generate`.

Under ``torchrun --nproc-per-node G vitqc generate ...`` the classes are split across the G ranks.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitqc.cli.options import (Channels, Checkpoint, CropPct, ImgSize, Interp, Mean, ModelKwargs, Pretrained, Seed,
                               Std, model_options, preprocess_from_flags)


def generate_command(
    model: Annotated[str, typer.Argument(help="the FP model: demo | timm:NAME | model.pt | program.pt2 | file.py:factory")],
    calib: Annotated[str, typer.Option("--calib", help="inversion | noise | prompts | learned-prompts[:FILE] (KIND:key=value,... sets options)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="cache directory (resumed when it holds an unfinished run)")],
    per_class: Annotated[int, typer.Option("--per-class", help="images per class")] = 10,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="images per shard, the unit of resumption (default min(per-class, 64))")] = None,
    opt: Annotated[list[str], typer.Option("--opt", help="source option KEY=VALUE, repeatable (e.g. steps=100)")] = [],
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="class names, one per line (needed for prompts / learned-prompts unless the model is an ImageNet one)")] = None,
    diffusion: Annotated[Optional[str], typer.Option("--diffusion", help="SD-Turbo hub id or local diffusers folder (default stabilityai/sd-turbo)")] = None,
    seed: Seed = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda when available; cuda:LOCAL_RANK under torchrun)")] = None,
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Generate calibration images without real data into an ImageFolder cache (DIR/<class>/*.png + manifest.json)."""
    from vitqc.calib import distributed as dist
    from vitqc.calib.spec import generate
    from vitqc.console import out

    started = time.time()
    stats = generate(model, calib, out_dir, per_class, shard_size=shard_size, options=opt, class_names=class_names,
                     diffusion=diffusion, seed=seed, device=device,
                     preprocess=preprocess_from_flags(img_size, mean, std, interpolation, crop_pct, channels),
                     model_options=model_options(model_kwargs, checkpoint, pretrained))
    if dist.is_main():
        rate = f"{stats['images_per_second']:.1f} images/s" if stats["generated"] else "nothing left to do"
        who = f"rank 0 of {dist.world_size()} " if dist.world_size() > 1 else ""
        out.print(f"{who}wrote {stats['generated']} images in {stats['shards_written']} shards to {out_dir} "
                  f"({stats['shards_skipped']} shards already done; {rate}) in {time.time() - started:.1f}s")
        if "learn_seconds_per_class" in stats:
            out.print(f"prompt learning: {stats['learn_classes']} classes, {stats['learn_seconds_per_class']:.2f} s/class")
        out.print(f"use it: vitqc compile {model} --pipeline NAME --calib {out_dir}")
