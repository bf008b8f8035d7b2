"""``vitqc report``: one HTML page with plots of what a compile did, made from the artifact alone.

    report/
    ├── index.html         the manifest's summary (model, pipeline, calibration, measurements, coverage) + plots
    ├── sqnr.png           per-layer SQNR on the images the compile measured on (held out from the ranges)
    ├── bits.png           weight and activation bit widths per layer (the mixed-precision choice, if any)
    ├── loss.png           the joint optimizer's loss curves (pipelines with joint_optimize)
    ├── calibration.png    the first calibration images
    └── ranges.png         FP input distributions of the worst layers with their quantization ranges

Plots that a pipeline has no data for are left out and the page says why.
"""
from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

import torch

from vitqc.errors import VitqcError

__all__ = ["write_report", "PREVIEW_MEMBER", "preview_png", "read_preview"]

PREVIEW_MEMBER = "calibration/preview.png"
PREVIEW_IMAGES = 16
WORST_LAYERS = 4


# ------------------------------------------------------------------------------------- calibration preview
def preview_png(images: torch.Tensor, preprocess: Any) -> bytes:
    """The first calibration images (normalised model inputs) as one PNG strip, side by side, for the report."""
    from PIL import Image

    x = images[:PREVIEW_IMAGES].detach().float().cpu()
    mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # [N, C, H, W] in [0, 255]
    strip = torch.cat(list(pixels), dim=2)  # [C, H, N*W]
    array = strip.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode="L" if array.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_preview(data: bytes, count: int, preprocess: Any) -> torch.Tensor:
    """The preview strip back as normalised model inputs ``[count, C, H, W]``."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > 64 * 4096 * 4096:
            raise VitqcError("the artifact's calibration preview is implausibly large")
        array = np.asarray(image.convert("L" if preprocess.channels == 1 else "RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(array)
    x = x[..., None] if x.dim() == 2 else x
    width = x.shape[1] // count
    images = torch.stack([x[:, i * width:(i + 1) * width] for i in range(count)]).permute(0, 3, 1, 2)
    mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float, columns: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, columns, figsize=(width, height), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _sqnr_plot(manifest: dict, out: Path) -> tuple[str | None, str]:
    m = manifest.get("summary", {}).get("measurement")
    if not m or not m.get("sqnr_db"):
        return None, "no per-layer measurement in this artifact"
    layers = {l["path"]: l for l in manifest["layers"]}
    names = list(m["sqnr_db"])
    values = [v if v is not None else float("nan") for v in m["sqnr_db"].values()]
    plt, fig, ax = _figure(max(6, 0.28 * len(names) + 2), 4)
    colors = {8: "#4c72b0", 6: "#55a868", 4: "#dd8452", 3: "#c44e52", 1.58: "#8172b3"}
    bar_colors = [colors.get(layers.get(n, {}).get("weight_bits"), "#999999") for n in names]
    ax.bar(range(len(names)), values, color=bar_colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"per-layer SQNR on {m['data']}")
    from matplotlib.patches import Patch

    used = [b for b in colors if any(layers.get(n, {}).get("weight_bits") == b for n in names)]
    ax.legend(handles=[Patch(color=colors[b], label=f"W{b:g}") for b in used], fontsize=7)
    return _save(plt, fig, out / "sqnr.png"), f"measured on {m['data']}"


def _bits_plot(manifest: dict, out: Path) -> tuple[str | None, str]:
    weight = [l for l in manifest["layers"] if l.get("weight_bits") is not None]
    if not weight:
        return None, "no weight layer is quantized"
    plt, fig, ax = _figure(max(6, 0.28 * len(weight) + 2), 3.2)
    xs = range(len(weight))
    ax.bar([x - 0.2 for x in xs], [l["weight_bits"] for l in weight], width=0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], [l.get("act_bits") or 0 for l in weight], width=0.4, label="input activations")
    ax.set_xticks(list(xs), [l["path"] for l in weight], rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.legend(fontsize=7)
    searched = "mixed_precision_search" in manifest.get("record", {})
    ax.set_title("bit widths per layer" + (" (mixed-precision search)" if searched else ""))
    return _save(plt, fig, out / "bits.png"), "chosen by the mixed-precision search" if searched else "uniform widths"


def _loss_plot(manifest: dict, out: Path) -> tuple[str | None, str]:
    record = manifest.get("record", {}).get("joint_optimize")
    if record is None:
        return None, "this pipeline has no joint_optimize step"
    history = record.get("history")
    if not history or not history.get("step"):
        return None, "the joint optimizer recorded no loss history"
    plt, fig, ax = _figure(7, 3.6)
    for key, values in history.items():
        if key != "step":
            ax.plot(history["step"], values, label=key, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"joint optimization ({record.get('iterations')} steps x batch {record.get('batch_size')})")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "loss.png"), f"{len(history['step'])} logged steps"


def _preview_plot(preview: bytes | None, out: Path) -> tuple[str | None, str]:
    if preview is None:
        return None, "the artifact holds no calibration preview"
    from PIL import Image

    with Image.open(io.BytesIO(preview)) as image:
        scale = max(1, 96 // max(1, image.height))
        image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(out / "calibration.png")
    return "calibration.png", "the first calibration images, as the model saw them (after resizing)"


def _input_ranges(art: Any, images: torch.Tensor, worst: list[str]) -> dict[str, torch.Tensor]:
    """FP inputs of each layer in ``worst`` (reference program on ``images``): the first value entering the
    layer's scope from outside it."""
    from torch import fx

    from vitqc.scopes import node_scopes

    gm = art.reference
    firsts: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        for path in node_scopes(node) & set(worst):
            if path in firsts or node.op not in ("call_function", "call_method", "call_module"):
                continue
            for arg in node.args:
                if isinstance(arg, fx.Node) and path not in node_scopes(arg) and arg.op != "get_attr":
                    firsts[path] = arg
                    break
    wanted = {node: path for path, node in firsts.items()}
    values: dict[str, torch.Tensor] = {}

    class Taps(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in wanted and isinstance(result, torch.Tensor):
                values[wanted[n]] = result.detach().flatten().float()
            return result

    with torch.no_grad():
        Taps(gm).run(images)
    return values


def _ranges_plot(art: Any, images: torch.Tensor | None, out: Path) -> tuple[str | None, str]:
    m = art.manifest.get("summary", {}).get("measurement")
    if images is None or not m or not m.get("sqnr_db"):
        return None, "needs the calibration preview and a per-layer measurement"
    scored = [(v, p) for p, v in m["sqnr_db"].items() if v is not None]
    worst = [p for _, p in sorted(scored)[:WORST_LAYERS]]
    values = _input_ranges(art, images, worst)
    if not values:
        return None, "the worst layers' inputs could not be found in the FP program"
    state = art.quantized_program.state_dict
    iq = next((s["options"] for s in art.manifest["pipeline"].get("passes", []) if s.get("name") == "insert_quantizers"), {})
    plt, fig, axes = _figure(3.2 * len(values), 3, columns=len(values))
    axes = list(axes) if len(values) > 1 else [axes]
    layers = {l["path"]: l for l in art.manifest["layers"]}
    for ax, path in zip(axes, [p for p in worst if p in values]):
        x = values[path]
        ax.hist(x.numpy(), bins=80, color="#4c72b0", log=True)
        scale, zp = state.get(f"{path}.input_quantizer.scale"), state.get(f"{path}.input_quantizer.zero_point")
        bits = layers.get(path, {}).get("act_bits")
        if scale is not None and scale.numel() == 1 and bits:
            symmetric = bool(iq.get("act_symmetric", False))
            levels = 2 ** int(bits)
            qmin, qmax = (-(levels // 2), levels // 2 - 1) if symmetric else (0, levels - 1)
            z = float(zp) if zp is not None and zp.numel() == 1 else 0.0
            for q in (qmin, qmax):
                ax.axvline((q - z) * float(scale), color="#c44e52", linestyle="--", linewidth=1)
        ax.set_title(f"{path}\n{m['sqnr_db'][path]:.1f} dB", fontsize=8)
        ax.tick_params(labelsize=7)
    static = any(state.get(f"{p}.input_quantizer.scale") is not None for p in values)
    fig.suptitle("FP input values of the worst layers" + (" (dashed: the quantization range)" if static else
                 " (per-token quantizers: the range follows each token)"), fontsize=9)
    return _save(plt, fig, out / "ranges.png"), f"the {len(values)} layers with the lowest SQNR, on the preview images"


# -------------------------------------------------------------------------------------------------- page
def _rows(manifest: dict) -> list[tuple[str, str]]:
    cal = manifest.get("calibration", {})
    m = manifest.get("summary", {}).get("measurement") or {}
    cov = manifest.get("coverage") or {}
    rows = [
        ("model", json.dumps({k: v for k, v in manifest["model"].items() if k in ("spec", "form", "name", "card", "class")})),
        ("pipeline", f"{manifest['pipeline']['name']}: {manifest['pipeline'].get('description', '')}"),
        ("overrides", ", ".join(manifest.get("overrides", [])) or "none"),
        ("calibration", f"{cal.get('source', '?')}: {cal.get('images', '?')} images, {cal.get('held_out', 0)} held out"),
    ]
    if m:
        line = f"agreement with FP {m['agreement']:.2%} on {m['data']}"
        if m.get("labeled"):
            line += f"; top-1 FP {m['reference_top1']:.2%}, quantized {m['quantized_top1']:.2%}"
        rows.append(("measured", line))
    if cov:
        rows.append(("coverage", json.dumps(cov)[:400]))
    rows += [("compile time", f"{manifest.get('compile_seconds', '?')} s"),
             ("versions", ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()))]
    return rows


def write_report(artifact: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of ``artifact`` into ``out_dir`` (default ``<artifact stem>.report``); returns the page."""
    from vitqc.archive import member_reader, open_archive
    from vitqc.artifact import load_artifact

    art = load_artifact(artifact)
    out = Path(out_dir) if out_dir is not None else Path(str(artifact).removesuffix(".vitqc") + ".report")
    if out.exists() and not out.is_dir():
        raise VitqcError(f"report folder {str(out)!r} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with open_archive(Path(artifact), "artifact") as zf:
        preview = member_reader(zf, repr(str(artifact)))(PREVIEW_MEMBER) if PREVIEW_MEMBER in zf.namelist() else None
    count = art.manifest.get("calibration", {}).get("preview_images")
    images = read_preview(preview, int(count), art.preprocess) if preview is not None and count else None
    manifest = art.manifest
    plots = [("Per-layer SQNR", *_sqnr_plot(manifest, out)), ("Bit widths", *_bits_plot(manifest, out)),
             ("Joint optimization", *_loss_plot(manifest, out)), ("Calibration images", *_preview_plot(preview, out)),
             ("Activation ranges", *_ranges_plot(art, images, out))]
    title = f"vitqc report: {html.escape(Path(artifact).name)}"
    body = ["<table>"] + [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                          for k, v in _rows(manifest)] + ["</table>"]
    for heading, png, note in plots:
        body.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(note)}</p>")
        if png:
            body.append(f"<img src='{png}' alt='{html.escape(heading)}'>")
    page = out / "index.html"
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1040px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 4px 12px; border-bottom: 1px solid #ddd;
vertical-align: top; font-size: 14px; }} th {{ color: #555; font-weight: 600; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; display: block; }} .note {{ color: #666; font-size: 13px; margin: 0 0 6px; }}
h2 {{ margin-top: 1.6em; font-size: 18px; }}
</style></head><body><h1>{title}</h1>
{"".join(body)}
</body></html>
""")
    return page

