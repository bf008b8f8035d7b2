"""``vitqc generate``: write a calibration source's images as an ImageFolder-style cache, resumably.

Layout::

    DIR/manifest.json                  source, options, seed, classes, plan, progress ("running"/"complete")
    DIR/<index>_<name>/<n>.png         one PNG per image (8-bit, the model's input size and channels)
    DIR/.shards/<class>-<shard>.json   a marker per finished shard (written last, atomically)
    DIR/learned_prompts.safetensors    learned-prompts only: the learned embeddings (reused on resume)

The plan is ``per_class`` images per class, cut into shards of ``shard_size`` images of one class. A shard's
PNGs are written to a temporary folder, moved into place, then its marker is written: a shard without a
marker is generated again (overwriting any of its files), one with a marker is skipped. So an interrupted
run resumes where it stopped, and ``vitqc compile --calib DIR`` reads the folder like any folder of
images. Under torchrun each rank writes the shards of its classes (``c % world == rank``); rank 0 writes
the manifest.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vitqc.calib import Source
from vitqc.calib import distributed as dist
from vitqc.calib.classes import folder_names
from vitqc.errors import VitqcError

MANIFEST = "manifest.json"
SHARDS = ".shards"
FORMAT = "vitqc.calib-cache/1"
# options that change how fast a cache is made, not what it holds
_RUNTIME_OPTIONS = {"batch_size", "embeddings", "checkpointing"}


@dataclass(frozen=True)
class Shard:
    label: int
    number: int
    start: int  # first index within the class
    stop: int

    @property
    def id(self) -> str:
        return f"{self.label:05d}-{self.number:04d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(classes: Sequence[int], per_class: int, shard_size: int) -> list[Shard]:
    if per_class < 1:
        raise VitqcError(f"--per-class {per_class} is not positive: pass at least 1")
    if shard_size < 1:
        raise VitqcError(f"--shard-size {shard_size} is not positive: pass at least 1")
    return [Shard(c, j, j * shard_size, min(per_class, (j + 1) * shard_size))
            for c in classes for j in range(math.ceil(per_class / shard_size))]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def read_manifest(directory: str | Path) -> dict | None:
    """The cache manifest of ``directory``, or None when it is not a vitqc cache."""
    path = Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _identity(config: dict) -> dict:
    """What must match for a cache to be resumed: everything but runtime-only options."""
    ident = {k: v for k, v in config.items() if k not in ("progress", "status", "created", "updated", "stats")}
    ident["options"] = {k: v for k, v in config.get("options", {}).items() if k not in _RUNTIME_OPTIONS}
    return ident


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def _write_shard(root: Path, folder: str, shard: Shard, images: torch.Tensor, seconds: float) -> None:
    tmp = root / SHARDS / f"tmp-{shard.id}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = []
    for offset, image in enumerate(images):
        name = f"{shard.start + offset:06d}.png"
        Image.fromarray(_to_uint8(image)).save(tmp / name)
        names.append(name)
    target = root / folder
    target.mkdir(exist_ok=True)
    for name in names:
        os.replace(tmp / name, target / name)
    tmp.rmdir()
    _write_json(root / SHARDS / f"{shard.id}.json",
                {"shard": shard.id, "label": shard.label, "folder": folder, "files": names,
                 "seconds": round(seconds, 3)})


def _done(root: Path) -> set[str]:
    d = root / SHARDS
    return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()


def write_cache(source: Source, out_dir: str | Path, per_class: int, shard_size: int | None = None,
                classes: Sequence[int] | None = None, quiet: bool = False,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate ``per_class`` images of each class with ``source`` into ``out_dir`` (resuming a previous
    run with the same settings). Returns this process's stats: images generated, shards written and
    skipped, seconds, images/s."""
    from vitqc.console import progress_bar

    root = Path(out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise VitqcError(f"--out {root} is a file: pass a directory for the cache")
    all_classes = list(range(source.num_classes)) if classes is None else sorted(set(classes))
    shard_size = shard_size or min(per_class, 64)
    plan = plan_shards(all_classes, per_class, shard_size)
    folders = folder_names(source.class_names)
    described = source.describe()
    config = {"format": FORMAT, "source": described["source"], "options": described["options"],
              **{k: v for k, v in described.items() if k not in ("source", "options")},
              "seed": source.seed, "per_class": per_class, "shard_size": shard_size, "classes": all_classes,
              "class_names": source.class_names, "folders": folders,
              "preprocess": source.preprocess.to_dict(), **(extra or {})}
    previous = read_manifest(root)
    if previous is not None and _identity(previous) != _identity(config):
        diff = sorted(k for k in set(_identity(previous)) | set(_identity(config))
                      if _identity(previous).get(k) != _identity(config).get(k))
        raise VitqcError(f"{root} holds a cache made with other settings ({', '.join(diff)} differ): "
                         f"resume with the same settings, or pass another --out")
    ours = {MANIFEST, "learned_prompts.safetensors"}  # learned prompts are saved before the manifest
    if previous is None and root.is_dir() and any(not p.name.startswith(".") and p.name not in ours
                                                   and not p.name.startswith("learned_prompts.rank")
                                                   for p in root.iterdir()):
        raise VitqcError(f"{root} exists and is not a vitqc calibration cache: pass an empty or new --out directory")
    created = (previous or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    mine = set(dist.shard_classes(all_classes))
    done = _done(root)
    todo = [s for s in plan if s.label in mine and s.id not in done]
    skipped = [s for s in plan if s.label in mine and s.id in done]
    started = time.perf_counter()
    source.prepare(sorted({s.label for s in todo}))  # loads/learns first: a failure here writes no cache
    prepared = time.perf_counter()
    if dist.is_main():
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
        _write_json(root / MANIFEST, {**config, "status": "running", "created": created,
                                      "progress": {"shards": len(plan), "done": len(_done(root) & {s.id for s in plan})}})
    dist.barrier()
    generated = 0
    batch = max(1, source.batch_size)
    total_mine = sum(len(s) for s in plan if s.label in mine)
    quiet = quiet or not dist.is_main()
    with progress_bar(f"generate {source.name}", total_mine, unit="images", quiet=quiet,
                      completed=sum(len(s) for s in skipped)) as bar:
        # jobs: runs of whole shards of at most max(batch, shard) images, generated in chunks of `batch`
        jobs: list[list[Shard]] = []
        for shard in todo:
            if jobs and sum(len(s) for s in jobs[-1]) + len(shard) <= max(batch, shard_size):
                jobs[-1].append(shard)
            else:
                jobs.append([shard])
        for job in jobs:
            t0 = time.perf_counter()
            items = [(s.label, i) for s in job for i in range(s.start, s.stop)]
            images = []
            for k in range(0, len(items), batch):
                chunk = items[k:k + batch]
                labels = torch.tensor([c for c, _ in chunk], dtype=torch.long)
                indices = torch.tensor([i for _, i in chunk], dtype=torch.long)
                images.append(source.generate_batch(labels, indices))
                bar.advance(len(chunk))
            images_t = torch.cat(images)
            seconds = (time.perf_counter() - t0) / len(job)
            offset = 0
            for shard in job:
                _write_shard(root, folders[shard.label], shard, images_t[offset:offset + len(shard)], seconds)
                offset += len(shard)
                generated += len(shard)
            if dist.world_size() == 1:
                _write_json(root / MANIFEST, {**config, "status": "running", "created": created,
                                              "progress": {"shards": len(plan), "done": len(_done(root) & {s.id for s in plan})}})
    elapsed = time.perf_counter() - started
    stats = {"rank": dist.rank(), "generated": generated, "shards_written": len(todo), "shards_skipped": len(skipped),
             "seconds": round(elapsed, 2), "seconds_prepare": round(prepared - started, 2),
             "images_per_second": round(generated / max(time.perf_counter() - prepared, 1e-9), 2), **source.stats}
    all_stats = dist.gather_dict({dist.rank(): stats})
    dist.barrier()
    if dist.is_main():
        finished = len(_done(root) & {s.id for s in plan})
        _write_json(root / MANIFEST, {
            **config, "status": "complete" if finished == len(plan) else "running", "created": created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "progress": {"shards": len(plan), "done": finished},
            "stats": [all_stats[r] for r in sorted(all_stats)] if all_stats else [stats]})
    dist.barrier()
    return stats


def describe_cache(directory: str | Path) -> dict | None:
    """(For ``compile --calib DIR``) the cache's source record, warning when it is unfinished."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    if manifest.get("status") != "complete":
        from vitqc.console import warn

        p = manifest.get("progress", {})
        warn(f"{directory} is an unfinished {manifest.get('source')} cache ({p.get('done')}/{p.get('shards')} shards): "
             f"run vitqc generate again with the same options to finish it")
    return {"cache_source": manifest.get("source"), "cache_options": manifest.get("options"),
            "cache_seed": manifest.get("seed")}
