"""``vitqc``: compile, eval, pipelines, passes.

Every user error is one line on stderr and exit code 2 (see vitqc.errors.VitqcError); nothing is written
unless the whole command succeeds.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from vitqc.errors import VitqcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of Vision Transformers, as a compiler over torch.fx graphs.")
out = Console(soft_wrap=True)  # one line per item, whatever the terminal width
err = Console(stderr=True)

ModelKwargs = Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON kwargs for timm:NAME or file.py:factory")]
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="weights (.safetensors or state dict) for timm:NAME")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="download timm's pretrained weights (needs internet)")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="input size for models without a timm data config")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="comma-separated channel means (non-timm models)")]
Std = Annotated[Optional[str], typer.Option("--std", help="comma-separated channel stds (non-timm models)")]
Interp = Annotated[str, typer.Option("--interpolation", help="resize interpolation (non-timm models)")]
CropPct = Annotated[float, typer.Option("--crop-pct", help="center-crop fraction (non-timm models)")]
Channels = Annotated[int, typer.Option("--channels", help="input channels (non-timm models)")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VitqcError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.485,0.456,0.406)") from None


def _model_and_preprocess(model: str, model_kwargs: str | None, checkpoint: Path | None, pretrained: bool,
                          img_size: int | None, mean: str | None, std: str | None, interpolation: str,
                          crop_pct: float, channels: int):
    """Load the model and decide its preprocessing: timm's data config when it has one, else the flags."""
    from vitqc.data import Preprocess

    if model == "demo":
        from vitqc import demo

        return demo.load_demo_model(), {"form": "demo", "card": demo.demo_card()["name"]}, demo.demo_preprocess()
    from vitqc.models import load_model

    try:
        kwargs = json.loads(model_kwargs) if model_kwargs else None
    except json.JSONDecodeError as e:
        raise VitqcError(f"--model-kwargs is not valid JSON ({e.msg}); e.g. --model-kwargs '{{\"num_classes\": 10}}'") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise VitqcError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    loaded = load_model(model, model_kwargs=kwargs, checkpoint=str(checkpoint) if checkpoint else None,
                        pretrained=pretrained)
    if img_size is not None or loaded.data_config is None:
        if img_size is None:
            raise VitqcError(f"{model!r} carries no timm data config: give --img-size (and --mean/--std if it normalises)")
        pre = Preprocess.from_flags(img_size=img_size, mean=_floats(mean), std=_floats(std),
                                    interpolation=interpolation, crop_pct=crop_pct, channels=channels)
    else:
        pre = Preprocess.from_timm(loaded.data_config)
    return loaded.module, loaded.source, pre


def _calibration(spec: str, preprocess, size: int | None, seed: int, module=None,
                 class_names: Path | None = None, diffusion: str | None = None):
    """Calibration batches and their record: images:DIR (a vitqc generate cache too), demo, or a generated
    source (noise, inversion, prompts, learned-prompts: 256 images unless --calib-size) made with ``module``."""
    from vitqc.data import load_calibration, parse_calib_spec

    kind, value = parse_calib_spec(spec)
    if kind == "images":
        from vitqc.calib.cache import describe_cache

        info = {"source": "images", "dir": str(value), **(describe_cache(value) or {})}
        return load_calibration(value, preprocess, size=size, seed=seed), info
    if kind == "demo":
        from vitqc import demo

        return demo.demo_calibration(size=size, seed=seed), {"source": "demo", "split": "train"}
    if module is None:
        raise VitqcError(f"calibration source {kind!r} needs the FP model")
    from vitqc.calib.spec import synthesize

    return synthesize(kind, value, module, preprocess, size, seed, class_names=class_names, diffusion=diffusion)


def _eval_batches(model_name: str, eval_data: Path | None, preprocess, limit: int | None):
    if eval_data is not None:
        from vitqc.data import ImageFolderData, iterate_labeled

        data = ImageFolderData(eval_data, require_classes=True)
        total = min(limit, len(data.samples)) if limit else len(data.samples)
        return list(iterate_labeled(data, preprocess, limit=limit)), total, str(eval_data)
    if model_name == "demo":
        from vitqc import demo

        batches = list(demo.demo_eval_batches())
        return batches, sum(len(y) for _, y in batches), "demo test split"
    return None, 0, None


def _bits(value: Any) -> str:
    return "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _layer_table(layers: list[dict], sqnr: dict[str, float | None], title: str) -> Table:
    """One row per weight layer; attention matmul/softmax quantizers are summarised in the caption."""
    table = Table(title=title, show_lines=False)
    for col in ("layer", "kind", "W bits", "A bits", "SQNR dB"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    attention = [l for l in layers if l["kind"] in ("matmul", "softmax")]
    for layer in layers:
        if layer in attention:
            continue
        value = sqnr.get(layer["path"])
        table.add_row(layer["path"], layer["kind"], _bits(layer.get("weight_bits")), _bits(layer.get("act_bits")),
                      "" if value is None else f"{value:.1f}")
    if attention:
        widths = sorted({_bits(l["act_bits"]) for l in attention})
        table.caption = (f"+ {sum(l['kind'] == 'matmul' for l in attention)} attention matmuls (both inputs) and "
                         f"{sum(l['kind'] == 'softmax' for l in attention)} softmax outputs at A{'/'.join(widths)}")
    return table


@app.command()
def compile(
    model: Annotated[str, typer.Argument(help="demo | timm:NAME | model.pt | program.pt2 | file.py:factory")],
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="built-in name (vitqc pipelines) or TOML path")],
    calib: Annotated[Optional[str], typer.Option("--calib", help="images:DIR (a vitqc generate cache too), or a data-free source: inversion, noise, prompts, learned-prompts[:FILE] (256 images unless --calib-size; KIND:key=value,... sets options); the demo model defaults to its own train split")] = None,
    calib_size: Annotated[Optional[int], typer.Option("--calib-size", help="number of calibration images (default: all)")] = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="artifact path (default: <model>-<pipeline>.vitqc)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    set_: Annotated[list[str], typer.Option("--set", help="PASS.OPTION=VALUE, repeatable (e.g. calibrate.method=mse)")] = [],
    dump_graphs: Annotated[Optional[Path], typer.Option("--dump-graphs", help="write each pass's graph to DIR")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="ImageFolder to report FP vs quantized top-1 on")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", help="evaluate on N images spread over classes")] = None,
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="class names, one per line (for --calib prompts / learned-prompts)")] = None,
    diffusion: Annotated[Optional[str], typer.Option("--diffusion", help="SD-Turbo hub id or local diffusers folder (default stabilityai/sd-turbo)")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="checkpoints of long passes (default: <out>.work)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoints in --work-dir")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto (cuda when available)")] = "auto",
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Quantize MODEL with a pipeline and write one artifact (.vitqc)."""
    import torch

    from vitqc import compiler, distributed
    from vitqc.artifact import check_writable, export_program, package_versions, save_artifact
    from vitqc.capture import capture
    from vitqc.evaluate import compare
    from vitqc.pipeline import load_pipeline

    started = time.time()
    pipe = load_pipeline(pipeline).with_overrides(set_)
    stem = Path(model.split(":")[-1]).stem if model != "demo" else "demo"
    target = out_path or Path(f"{stem}-{pipe.name}.vitqc")
    if distributed.is_main():  # under torchrun rank 0 alone writes (checkpoints, the artifact)
        check_writable(target)
    torch.manual_seed(seed)
    module, source, pre = _model_and_preprocess(model, model_kwargs, checkpoint, pretrained, img_size, mean, std,
                                                interpolation, crop_pct, channels)
    if calib is None:
        if model != "demo":
            raise VitqcError("--calib is required: give images:DIR with calibration images (no labels needed), "
                             "or generate them without data: --calib inversion")
        calib = "demo"
    batches, calib_info = _calibration(calib, pre, calib_size, seed, module, class_names, diffusion)
    example = batches[0][:1]
    graph = capture(module, example)
    reference = copy.deepcopy(graph)  # compile() rewrites the graph it is given in place
    work = work_dir or target.with_name(target.name + ".work")
    if resume and distributed.is_main() and not work.is_dir():
        raise VitqcError(f"--resume: no work directory {str(work)!r}; pass the --work-dir of the interrupted run")
    run_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if run_device.startswith("cuda") and not torch.cuda.is_available():
        raise VitqcError("--device cuda: no CUDA device is available here; use --device cpu")
    quantized = compiler.compile(graph, pipe, batches, seed=seed, example=example, reference=reference,
                                 dump_graphs=str(dump_graphs) if dump_graphs else None, work_dir=str(work),
                                 resume=resume, device=run_device)
    if not distributed.is_main():
        return
    quantized, reference = quantized.cpu(), reference.cpu()
    err.print("[bold cyan]export[/] quantized and reference programs (torch.export)")
    q_program, ref_program = export_program(quantized, example), export_program(reference, example)
    record = quantized.meta["vitqc"]["record"]
    layers = record.get("insert_quantizers", {}).get("layers", [])
    weight_layers = [l["path"] for l in layers if l["kind"] in ("QuantLinear", "QuantConv2d")]
    summary: dict[str, Any] = {}
    on_calib = compare(ref_program.module(), q_program.module(), batches, weight_layers,
                       total=sum(len(b) for b in batches))
    summary["calibration"] = on_calib.to_dict()
    eval_batches, total, eval_name = _eval_batches(model, eval_data, pre, eval_limit)
    if eval_batches is not None:
        on_eval = compare(ref_program.module(), q_program.module(), eval_batches, total=total)
        summary["eval"] = {"data": eval_name, **on_eval.to_dict()}
    manifest = {
        "model": source, "pipeline": quantized.meta["vitqc"]["pipeline"], "overrides": list(set_),
        "seed": seed, "calibration": {**calib_info, "images": sum(len(b) for b in batches)},
        "preprocess": pre.to_dict(), "input_shape": list(example.shape[1:]), "layers": layers,
        "passes": quantized.meta["vitqc"]["passes"], "record": record, "summary": summary,
        "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "compile_seconds": round(time.time() - started, 1),
    }
    path = save_artifact(target, q_program, ref_program, manifest)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only for resuming an unfinished compile
    out.print(_layer_table(layers, summary["calibration"]["sqnr_db"], "per-layer SQNR on the calibration images"))
    out.print(f"agreement with FP on calibration images: {on_calib.agreement:.2%}")
    if "eval" in summary:
        e = summary["eval"]
        out.print(f"top-1 on {e['data']} ({e['labeled']} images): FP {e['reference_top1']:.2%}  "
                  f"{pipe.name} {e['quantized_top1']:.2%}  (agreement {e['agreement']:.2%})")
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - started:.1f}s")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="an artifact (.vitqc) or any model form that compile takes")],
    data: Annotated[Path, typer.Option("--data", help="ImageFolder directory with class subfolders")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="N images spread over classes")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    model_kwargs: ModelKwargs = None, checkpoint: Checkpoint = None, pretrained: Pretrained = False,
    img_size: ImgSize = None, mean: Mean = None, std: Std = None, interpolation: Interp = "bicubic",
    crop_pct: CropPct = 1.0, channels: Channels = 3,
) -> None:
    """Top-1 of a model; for an artifact also agreement with its FP model and a per-layer SQNR table."""
    from vitqc.artifact import is_artifact, load_artifact
    from vitqc.data import ImageFolderData, Preprocess, iterate_labeled
    from vitqc.evaluate import compare, top1

    dataset = ImageFolderData(data, require_classes=True)
    total = min(limit, len(dataset.samples)) if limit else len(dataset.samples)
    if is_artifact(model):
        art = load_artifact(model)
        pre = Preprocess.from_dict(art.manifest["preprocess"])
        batches = iterate_labeled(dataset, pre, batch_size=batch_size, limit=limit)
        if art.reference_program is None:
            acc = top1(art.quantized, batches, total=total)
            result: dict[str, Any] = {"artifact": str(model), "quantized_top1": acc, "images": total}
        else:
            cmp = compare(art.reference, art.quantized, batches, art.layer_paths, total=total)
            result = {"artifact": str(model), "pipeline": art.manifest["pipeline"]["name"], **cmp.to_dict()}
        result["skipped_unreadable"] = dataset.skipped
        if as_json:
            print(json.dumps(result, indent=2))
            return
        if "sqnr_db" in result:
            out.print(_layer_table(art.manifest.get("layers", []), result["sqnr_db"], f"per-layer SQNR ({total} images)"))
            out.print(f"top-1: FP {result['reference_top1']:.2%}  quantized ({result['pipeline']}) "
                      f"{result['quantized_top1']:.2%}  agreement {result['agreement']:.2%}  on {result['images']} images")
        else:
            out.print(f"top-1: quantized {result['quantized_top1']:.2%} on {total} images")
        return
    module, _, pre = _model_and_preprocess(model, model_kwargs, checkpoint, pretrained, img_size, mean, std,
                                           interpolation, crop_pct, channels)
    acc = top1(module, iterate_labeled(dataset, pre, batch_size=batch_size, limit=limit), total=total)
    if as_json:
        print(json.dumps({"model": model, "top1": acc, "images": total, "skipped_unreadable": dataset.skipped}))
    else:
        out.print(f"top-1: {acc:.2%} on {total} images")


@app.command()
def pipelines() -> None:
    """List the built-in pipelines."""
    from vitqc.pipeline import builtin_pipelines

    for name, pipe in builtin_pipelines().items():
        out.print(f"[bold]{name:<16}[/] {pipe.description}", highlight=False)


@app.command()
def passes(
    name: Annotated[Optional[str], typer.Argument(help="a pass: show its file, requires/ensures and options")] = None,
) -> None:
    """List the registered passes, or describe one."""
    import dataclasses
    import inspect

    from vitqc.passes.base import get_pass, registered_passes

    if name is None:
        for pass_name, cls in registered_passes().items():
            out.print(f"[bold]{pass_name:<20}[/] {cls.summary}", highlight=False)
        return
    cls = get_pass(name)
    out.print(f"[bold]{cls.name}[/]: {cls.summary}", highlight=False)
    out.print(f"defined in {inspect.getsourcefile(cls)} ({cls.__module__}.{cls.__qualname__})", highlight=False)
    out.print(f"requires: {', '.join(cls.requires) or '-'}; ensures: {', '.join(cls.ensures) or '-'}", highlight=False)
    fields = dataclasses.fields(cls.Options) if dataclasses.is_dataclass(cls.Options) else ()
    if not fields:
        out.print("options: none")
        return
    limits = getattr(cls.Options, "limits", {})
    out.print(f"options (--set {cls.name}.OPTION=VALUE):", highlight=False)
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f"  ({limits[f.name]})" if f.name in limits else ""
        out.print(f"  {f.name}: {f.type} = {default!r}{allowed}", highlight=False, markup=False)


from vitqc.cli import generate as _generate  # noqa: E402,F401  (registers vitqc generate)
from vitqc.cli import export as _export  # noqa: E402,F401  (registers `vitqc export`)


def main(argv: list[str] | None = None) -> int:
    try:
        # without standalone mode typer returns the exit code of typer.Exit and of Ctrl-C (130)
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            err.print("interrupted; no artifact was written (continue with --resume where the pass checkpoints)")
        return code if isinstance(code, int) else 0
    except VitqcError as exc:
        from vitqc.distributed import rank_prefix

        err.print(f"[bold red]error:[/] {rank_prefix()}{exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
