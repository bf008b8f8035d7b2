"""``--calib noise``: Gaussian images, the floor every other calibration source must beat.

Each pixel is drawn from N(mean_c, std_c) per channel and clipped to [0, 1]. ``mean``/``std`` default to the
model's normalisation statistics (the data it was trained on, as far as the model says), or to ImageNet's
when the normalisation is the identity (mean 0, std 1: no information about the data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vitqc.calib import Source
from vitqc.calib.spec import register_source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class NoiseOptions:
    mean: tuple[float, ...] | None = None  # per-channel pixel mean in [0, 1] (default: see module doc)
    std: tuple[float, ...] | None = None
    batch_size: int = 64
    limits: ClassVar[dict[str, str]] = {"batch_size": ">= 1"}


def noise_stats(preprocess, mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = preprocess.channels
    identity = all(m == 0 for m in preprocess.mean) and all(s == 1 for s in preprocess.std)
    if mean is None:
        mean = (IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)) if identity else preprocess.mean
    if std is None:
        std = (IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)) if identity else preprocess.std
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    return mean, std


@register_source
class NoiseSource(Source):
    name = "noise"
    summary = "Gaussian noise images: the floor every other source must beat"
    Options = NoiseOptions

    def generate_batch(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        c, h, w = self.preprocess.input_size
        mean, std = noise_stats(self.preprocess, self.options.mean, self.options.std)
        m = torch.tensor(mean).view(c, 1, 1)
        s = torch.tensor(std).view(c, 1, 1)
        out = torch.empty(len(labels), c, h, w)
        for k, (label, index) in enumerate(zip(labels.tolist(), indices.tolist())):
            z = torch.randn(c, h, w, generator=self.item_generator(label, index))
            out[k] = (m + s * z).clamp_(0, 1)
        return out
