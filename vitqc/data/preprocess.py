"""Preprocessing: how an image becomes a model input (timm's eval transform with a channel-mode conversion in
front, so a model evaluated here sees what it would see under timm's eval scripts)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from vitqc.errors import VitqcError

__all__ = ["Preprocess", "ConvertMode", "INTERPOLATIONS", "CROP_MODES"]

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
