"""``vitqc generate``: write calibration images from a data-free source as a resumable ImageFolder cache.

    vitqc generate MODEL --calib SOURCE --out DIR [--per-class N] [--shard-size N] [--opt KEY=VALUE ...]
    vitqc compile MODEL --pipeline NAME --calib DIR     # reuses the cache

Under ``torchrun --nproc-per-node G vitqc generate ...`` the classes are split across the G ranks.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitqc.cli.main import (Channels, Checkpoint, CropPct, ImgSize, Interp, Mean, ModelKwargs, Pretrained, Std,
                            _model_and_preprocess, app, out)
from vitqc.errors import VitqcError


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="the FP model: demo | timm:NAME | model.pt | program.pt2 | file.py:factory")],
    calib: Annotated[str, typer.Option("--calib", help="inversion | noise | prompts | learned-prompts[:FILE] (KIND:key=value,... sets options)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="cache directory (resumed when it holds an unfinished run)")],
    per_class: Annotated[int, typer.Option("--per-class", help="images per class")] = 10,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="images per shard, the unit of resumption (default min(per-class, 64))")] = None,
    opt: Annotated[list[str], typer.Option("--opt", help="source option KEY=VALUE, repeatable (e.g. steps=100)")] = [],
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="class names, one per line (needed for prompts / learned-prompts unless the model is an ImageNet one)")] = None,
    diffusion: Annotated[Optional[str], typer.Option("--diffusion", help="SD-Turbo hub id or local diffusers folder (default stabilityai/sd-turbo)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda when available; cuda:LOCAL_RANK under torchrun)")] = None,
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Generate calibration images without real data into an ImageFolder cache (DIR/<class>/*.png + manifest.json)."""
    from vitqc.calib import distributed as dist
    from vitqc.calib.cache import write_cache
    from vitqc.calib.spec import make_cli_source, parse_options
    from vitqc.data import parse_calib_spec

    kind, value = parse_calib_spec(calib)
    if kind in ("images", "demo"):
        raise VitqcError("vitqc generate makes data-free calibration images: use --calib inversion, noise, prompts "
                         "or learned-prompts (images:DIR is read directly by vitqc compile)")
    started = time.time()
    dist.init_from_env()
    if device is None and dist.world_size() > 1:
        device = str(dist.local_device())
    module, _, pre = _model_and_preprocess(model, model_kwargs, checkpoint, pretrained, img_size, mean, std,
                                           interpolation, crop_pct, channels)
    extra = list(opt)
    if kind == "learned-prompts" and "embeddings" not in parse_options(kind, value, extra):
        extra.append(f"embeddings='{(out_dir / 'learned_prompts.safetensors').as_posix()}'")  # reused on resume
    source = make_cli_source(kind, value, module, pre, class_names=class_names, diffusion=diffusion, seed=seed,
                             extra=extra, device=device)
    stats = write_cache(source, out_dir, per_class, shard_size=shard_size, extra={"model": model})
    if dist.is_main():
        rate = f"{stats['images_per_second']:.1f} images/s" if stats["generated"] else "nothing left to do"
        who = f"rank 0 of {dist.world_size()} " if dist.world_size() > 1 else ""
        out.print(f"{who}wrote {stats['generated']} images in {stats['shards_written']} shards to {out_dir} "
                  f"({stats['shards_skipped']} shards already done; {rate}) in {time.time() - started:.1f}s")
        if "learn_seconds_per_class" in stats:
            out.print(f"prompt learning: {stats['learn_classes']} classes, {stats['learn_seconds_per_class']:.2f} s/class")
        out.print(f"use it: vitqc compile {model} --pipeline NAME --calib {out_dir}")
