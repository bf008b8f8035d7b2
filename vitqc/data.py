"""Images and preprocessing: ImageFolder-style directories, calibration batches, labelled eval batches.

The preprocessing is timm's own eval transform (``timm.data.create_transform``) with a channel-mode
conversion in front, so a model evaluated here sees what it would see under timm's eval scripts.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vitqc.distributed import is_main
from vitqc.errors import VitqcError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")

# Named normalisations accepted by Preprocess.from_flags (values from timm.data.constants).
_NAMED_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
_NAMED_STATS["openai"] = _NAMED_STATS["clip"]


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


class ConvertMode:
    """PIL image -> PIL image in ``mode`` ("L" or "RGB"). A class, not a lambda, so it pickles."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _floats(value: Any, channels: int, what: str) -> tuple[float, ...]:
    """Parse mean/std flag values: a number, a sequence, "a,b,c", or a named preset."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NAMED_STATS:
            value = _NAMED_STATS[text][0 if what == "mean" else 1]
        else:
            try:
                value = [float(part) for part in text.replace(" ", ",").split(",") if part]
            except ValueError:
                raise VitqcError(
                    f"--{what} {value!r} is not a list of numbers: pass e.g. --{what} 0.5,0.5,0.5 "
                    f"or one of {', '.join(sorted(_NAMED_STATS))}"
                ) from None
    if isinstance(value, (int, float)):
        value = [value]
    values = tuple(float(v) for v in value)
    if len(values) == 1 and channels != 1:
        values = values * channels
    if len(values) != channels:
        raise VitqcError(
            f"--{what} has {len(values)} values but the input has {channels} channel(s): "
            f"pass 1 or {channels} values"
        )
    return values


@dataclass
class Preprocess:
    """How an image file becomes a model input: timm-style eval resize + center crop + normalise."""

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        try:
            size = tuple(int(v) for v in self.input_size)
        except (TypeError, ValueError):
            raise VitqcError(f"input size {self.input_size!r} is not (C, H, W): pass three integers") from None
        if len(size) != 3 or min(size) < 1:
            raise VitqcError(f"input size {self.input_size!r} is not (C, H, W): pass three positive integers")
        self.input_size = size
        channels = size[0]
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != channels:
                raise VitqcError(
                    f"{what} has {len(values)} values but the input has {channels} channel(s): "
                    f"pass --mean/--std with {channels} value(s) each"
                )
        if any(not s > 0 for s in self.std):
            raise VitqcError(f"std {self.std} has a value <= 0: every std must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise VitqcError(
                f"interpolation {self.interpolation!r} is unknown: use one of {', '.join(INTERPOLATIONS)}"
            )
        self.crop_pct = float(self.crop_pct)
        if not 0.0 < self.crop_pct <= 1.0:
            raise VitqcError(f"crop_pct {self.crop_pct} is out of range: use a value in (0, 1]")
        if self.crop_mode not in CROP_MODES:
            raise VitqcError(f"crop mode {self.crop_mode!r} is unknown: use one of {', '.join(CROP_MODES)}")

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, data_config: dict) -> Preprocess:
        """From ``timm.data.resolve_data_config(...)`` output."""
        from timm.data.constants import DEFAULT_CROP_PCT

        try:
            input_size = tuple(data_config["input_size"])
            mean, std = data_config["mean"], data_config["std"]
        except KeyError as exc:
            raise VitqcError(f"timm data config lacks {exc.args[0]!r}: pass --img-size/--mean/--std") from None
        channels = int(input_size[0])
        mean, std = tuple(mean), tuple(std)
        # timm itself broadcasts a single value over the channels; anything else must match.
        if len(mean) == 1:
            mean = mean * channels
        if len(std) == 1:
            std = std * channels
        return cls(
            input_size=input_size,
            mean=mean,
            std=std,
            interpolation=data_config.get("interpolation") or "bicubic",
            crop_pct=data_config.get("crop_pct") or DEFAULT_CROP_PCT,
            crop_mode=data_config.get("crop_mode") or "center",
        )

    @classmethod
    def from_flags(
        cls,
        img_size: int | Sequence[int],
        mean: Any = None,
        std: Any = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        channels: int = 3,
    ) -> Preprocess:
        """From CLI flags. ``img_size``: N or (H, W). ``mean``/``std``: a number, a sequence, "a,b,c",
        or a preset name (imagenet, inception, clip); None means imagenet (3 channels only).
        ``interpolation`` defaults to bicubic, ``crop_pct`` to 1.0 (no crop)."""
        if isinstance(img_size, (int, float)):
            hw = (int(img_size), int(img_size))
        else:
            hw = tuple(int(v) for v in img_size)
            if len(hw) == 1:
                hw = (hw[0], hw[0])
            if len(hw) != 2:
                raise VitqcError(f"--img-size {img_size!r} is not N or HxW: pass e.g. --img-size 224")
        for what, value in (("mean", mean), ("std", std)):
            if value is None and channels != 3:
                raise VitqcError(f"--{what} is required for {channels}-channel input: pass {channels} value(s)")
        mean = _floats("imagenet" if mean is None else mean, channels, "mean")
        std = _floats("imagenet" if std is None else std, channels, "std")
        return cls(
            input_size=(int(channels), *hw),
            mean=mean,
            std=std,
            interpolation=interpolation or "bicubic",
            crop_pct=1.0 if crop_pct is None else crop_pct,
        )

    # -- use ---------------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to before the resize."""
        return "L" if self.channels == 1 else "RGB"

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised float tensor (C, H, W): timm's eval transform after a mode convert."""
        import torchvision.transforms as T

        if self.channels not in (1, 3):
            raise VitqcError(
                f"{self.channels}-channel input cannot be decoded from image files: only 1 (L) or 3 (RGB)"
            )
        try:
            inner = _timm_transform(self)
        except Exception:  # noqa: BLE001 - a timm API change must not break decoding; fall back
            inner = _torchvision_transform(self)
        return T.Compose([ConvertMode(self.mode), inner])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        missing = [k for k in ("input_size", "mean", "std") if k not in d]
        if missing:
            raise VitqcError(f"preprocessing record lacks {', '.join(missing)}: the artifact is incomplete")
        known = {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
        return cls(**{k: v for k, v in d.items() if k in known})


def _timm_transform(p: Preprocess):
    import timm.data

    return timm.data.create_transform(
        input_size=p.input_size,
        interpolation=p.interpolation,
        mean=p.mean,
        std=p.std,
        crop_pct=p.crop_pct,
        crop_mode=p.crop_mode,
    )


def _torchvision_transform(p: Preprocess):
    """The same eval transform as timm's for the center and squash modes, built from torchvision."""
    import torchvision.transforms as T

    _, h, w = p.input_size
    scale = (math.floor(h / p.crop_pct), math.floor(w / p.crop_pct))
    interp = T.InterpolationMode(p.interpolation)
    if p.crop_mode == "squash":
        resize = T.Resize(scale, interpolation=interp)
    elif scale[0] == scale[1]:
        resize = T.Resize(scale[0], interpolation=interp)
    else:
        raise VitqcError(f"crop mode {p.crop_mode!r} with a non-square size needs timm's transform")
    return T.Compose([resize, T.CenterCrop((h, w)), T.ToTensor(), T.Normalize(p.mean, p.std)])


# --------------------------------------------------------------------------------------------------
# Directories of images
# --------------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(directory: Path) -> list[Path]:
    """Image files under ``directory``, recursively (following links, as torchvision's ImageFolder does),
    skipping hidden files and folders; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if _is_image(Path(name)))
    return sorted(found)


class ImageFolderData:
    """An ImageFolder-style directory: ``DIR/<class>/<image>``; sorted class names give the indices.

    With ``require_classes=False`` (calibration) a flat ``DIR/<image>`` folder is accepted too; its
    samples get class index -1 and ``classes`` is empty. Images are found recursively inside each
    class folder. Files are not decoded here: unreadable ones are skipped (and counted in
    ``skipped``) when they are loaded.
    """

    def __init__(self, directory: str | Path, require_classes: bool = True, purpose: str | None = None):
        self.root = Path(directory).expanduser()
        self.require_classes = require_classes
        purpose = purpose or ("eval" if require_classes else "calibration")
        root = self.root
        if not root.exists():
            raise VitqcError(f"{root} does not exist: pass an existing folder of images for {purpose}")
        if not root.is_dir():
            raise VitqcError(f"{root} is a file, not a directory: pass the folder that holds the images")
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if not entries:
            raise VitqcError(f"{root} is empty: put images in {root}/<class>/<image> (ImageFolder layout)")
        class_dirs = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
        per_class = [_images_under(d) for d in class_dirs]
        loose = sorted(e for e in entries if e.is_file() and _is_image(e))

        self.skipped = 0
        if any(per_class):
            self.classes: list[str] = [d.name for d in class_dirs]
            self.samples: list[tuple[Path, int]] = [
                (path, index) for index, paths in enumerate(per_class) for path in paths
            ]
            self.flat = False
        elif loose:
            if require_classes:
                raise VitqcError(
                    f"{root} has no class subfolders: {purpose} needs {root}/<class>/<image> (ImageFolder layout)"
                )
            self.classes = []
            self.samples = [(path, -1) for path in loose]
            self.flat = True
        else:
            raise VitqcError(
                f"{root} has no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}): "
                f"put images in {root}/<class>/<image> (ImageFolder layout)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        layout = "flat" if self.flat else f"{len(self.classes)} classes"
        return f"ImageFolderData({str(self.root)!r}, {len(self.samples)} images, {layout})"


def decode(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (raises on unreadable/corrupt files)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


# --------------------------------------------------------------------------------------------------
# Selection, progress, warnings
# --------------------------------------------------------------------------------------------------


def balanced_order(labels: Sequence[int], seed: int) -> list[int]:
    """All indices of ``labels`` in a seeded order that is balanced across labels.

    Each label's indices are shuffled, the label order is shuffled, then indices are taken round-robin
    (one per label per round), so any prefix of the order is as balanced as the classes allow.
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    keys = sorted(groups)
    for key in keys:
        rng.shuffle(groups[key])
    rng.shuffle(keys)
    order: list[int] = []
    for round_ in range(max((len(g) for g in groups.values()), default=0)):
        for key in keys:
            if round_ < len(groups[key]):
                order.append(groups[key][round_])
    return order


def spread_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spread over range(n) (every k-th); all of them when limit is None/>= n."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise VitqcError(f"limit {limit} is not positive: pass a limit of at least 1")
    return [(i * n) // limit for i in range(limit)]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    from rich.text import Text

    _stderr_console().print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True, highlight=False)


def _warn_skipped(count: int, total: int, root: Path, first_error: str | None) -> None:
    if count:
        noun = "image" if count == 1 else "images"
        detail = f" (first: {first_error})" if first_error else ""
        warn(f"skipped {count} unreadable {noun} of {total} in {root}{detail}")


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Progress:
    """A rich progress bar on stderr counting images, with throughput in images/s."""

    def __init__(self, description: str, total: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                return Text("? images/s" if speed is None else f"{speed:,.1f} images/s", style="progress.data.speed")

        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_stderr_console(),
        )
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)


def progress_bar(description: str, total: int, enabled: bool = True):
    return _Progress(description, total) if enabled and is_main() else _NullProgress()  # torchrun: rank 0's console


# --------------------------------------------------------------------------------------------------
# Calibration and evaluation loading
# --------------------------------------------------------------------------------------------------


def _batches(tensors: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise VitqcError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
    return [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]


def load_calibration(
    directory: str | Path | ImageFolderData,
    preprocess: Preprocess,
    size: int | None,
    seed: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[torch.Tensor]:
    """``size`` images (all when None or more than available) chosen by a seeded choice balanced across
    class folders, decoded and preprocessed, as a list of batches. Unreadable images are skipped and
    replaced by the next ones in the seeded order."""
    data = directory if isinstance(directory, ImageFolderData) else ImageFolderData(directory, require_classes=False)
    if size is not None and size < 1:
        raise VitqcError(f"calibration size {size} is not positive: pass a size of at least 1 (or all)")
    if batch_size < 1:
        raise VitqcError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
    order = balanced_order([label for _, label in data.samples], seed)
    wanted = len(order) if size is None else min(size, len(order))
    transform = preprocess.transform()
    images: list[torch.Tensor] = []
    skipped, first_error = 0, None
    with progress_bar("calibration", wanted, progress) as bar:
        for index in order:
            if len(images) == wanted:
                break
            path = data.samples[index][0]
            try:
                image = decode(path)
            except Exception as exc:  # noqa: BLE001 - any decode failure means "unreadable"
                skipped += 1
                first_error = first_error or f"{path.name}: {exc}"
                continue
            images.append(transform(image))
            bar.advance(1)
    data.skipped += skipped
    _warn_skipped(skipped, skipped + len(images), data.root, first_error)
    if not images:
        raise VitqcError(f"none of the {len(order)} images in {data.root} could be read: check the files")
    return _batches(images, batch_size)


class LabeledImages(torch.utils.data.Dataset):
    """(path, label) samples -> (tensor, label) or (None, label, error) when the file is unreadable."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = decode(path)
        except Exception as exc:  # noqa: BLE001
            return None, label, f"{Path(path).name}: {exc}"
        return self.transform(image), label, None


def collate_skipping(items):
    """Collate (tensor|None, label, error) items -> (x|None, y|None, n_skipped, first_error)."""
    good = [(x, y) for x, y, _ in items if x is not None]
    errors = [e for x, _, e in items if x is None]
    if not good:
        return None, None, len(errors), (errors[0] if errors else None)
    x = torch.stack([x for x, _ in good])
    y = torch.tensor([y for _, y in good], dtype=torch.long)
    return x, y, len(errors), (errors[0] if errors else None)


def iterate_labeled(
    data: ImageFolderData,
    preprocess: Preprocess,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    description: str = "eval",
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled batches (x, y) from an ImageFolder directory; ``limit`` takes every k-th sample so the
    subset spreads over all classes. Unreadable images are skipped and counted into ``data.skipped``."""
    if data.flat:
        raise VitqcError(
            f"{data.root} has no class subfolders: {description} needs {data.root}/<class>/<image> (ImageFolder layout)"
        )
    if batch_size < 1:
        raise VitqcError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
    samples = [data.samples[i] for i in spread_indices(len(data.samples), limit)]
    loader = torch.utils.data.DataLoader(
        LabeledImages(samples, preprocess.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping,
    )
    skipped, yielded, first_error = 0, 0, None
    with progress_bar(description, len(samples), progress) as bar:
        for x, y, n_bad, error in loader:
            skipped += n_bad
            data.skipped += n_bad
            first_error = first_error or error
            bar.advance(n_bad + (0 if x is None else len(x)))
            if x is None:
                continue
            yielded += len(x)
            yield x, y
    _warn_skipped(skipped, len(samples), data.root, first_error)
    if not yielded:
        raise VitqcError(f"none of the {len(samples)} images in {data.root} could be read: check the files")


# --------------------------------------------------------------------------------------------------
# --calib specs
# --------------------------------------------------------------------------------------------------

CALIB_KINDS = ("images", "demo", "prompts", "learned-prompts", "inversion", "noise")
_CALIB_FORMS = "images:DIR, an existing directory, demo, prompts, learned-prompts, inversion, or noise"


def parse_calib_spec(text: str) -> tuple[str, str | None]:
    """Parse a ``--calib`` value into (kind, value).

    ``images:DIR`` and a bare existing directory give ("images", DIR); ``demo`` gives ("demo", None);
    ``prompts``, ``learned-prompts``, ``inversion``, ``noise`` give (kind, None), or (kind, VALUE) when
    written ``kind:VALUE``. A keyword wins over a same-named directory (write ``images:demo`` or ``./demo``).
    """
    spec = str(text).strip()
    if not spec:
        raise VitqcError(f"--calib is empty: use {_CALIB_FORMS}")
    kind, sep, value = spec.partition(":")
    if kind == "images" and sep:
        if not value:
            raise VitqcError("--calib images: needs a directory: use images:DIR")
        return "images", value
    if kind in CALIB_KINDS and kind not in ("images",):
        if kind == "demo" and sep:
            raise VitqcError(f"--calib {spec!r}: demo takes no value: use --calib demo")
        return kind, (value if sep and value else None)
    if Path(spec).expanduser().is_dir():
        return "images", spec
    if Path(spec).expanduser().exists():
        raise VitqcError(f"--calib {spec!r} is a file, not a directory: use {_CALIB_FORMS}")
    if "/" in spec or "\\" in spec or spec.startswith("."):
        raise VitqcError(f"--calib directory {spec} does not exist: pass an existing folder of images")
    raise VitqcError(f"--calib {spec!r} is not understood: use {_CALIB_FORMS}")
