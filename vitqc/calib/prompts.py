"""``--calib prompts``: the text baseline, SD-Turbo images of "a <adjective> photo of <adjective> <class>".

For item (class c, index i) the two adjectives are drawn from :data:`PHOTO_ADJECTIVES` and
:data:`OBJECT_ADJECTIVES` and the latent noise from the item's seed, so an item is the same image whatever
batch, shard or rank generates it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from vitqc.calib import Source, item_seed
from vitqc.calib.spec import register_source
from vitqc.calib.classes import prompt_name
from vitqc.calib.diffusion import DiffusionSource, DisagreementOptions

# describe the photograph
PHOTO_ADJECTIVES = (
    "good", "bright", "dark", "close-up", "cropped", "blurry", "sharp", "clean", "high-resolution",
    "low-resolution", "colorful", "vintage", "professional", "amateur", "detailed", "natural", "outdoor",
    "indoor", "candid", "grainy",
)
# describe the object
OBJECT_ADJECTIVES = (
    "small", "large", "old", "young", "new", "wet", "dirty", "clean", "shiny", "single", "beautiful",
    "strange", "typical", "cute", "weird", "big", "tiny", "colorful", "bright", "dark",
)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def class_prompt(name: str, photo_adjective: str | None = None, object_adjective: str | None = None) -> str:
    """``a <adj> photo of <a|an> <adj> <name>`` (adjectives optional)."""
    name = prompt_name(name)
    photo = f"a {photo_adjective} photo of" if photo_adjective else "a photo of"
    thing = f"{object_adjective} {name}" if object_adjective else name
    return f"{photo} {_article(thing)} {thing}"


def item_prompt(name: str, seed: int, label: int, index: int) -> str:
    rng = random.Random(item_seed(seed, label, index) ^ 0x5EED)
    return class_prompt(name, rng.choice(PHOTO_ADJECTIVES), rng.choice(OBJECT_ADJECTIVES))


@dataclass
class PromptOptions(DisagreementOptions):
    batch_size: int = 8
    resolution: int | None = None  # diffusion output size (default: the UNet's, 512 for SD-Turbo)
    limits: ClassVar[dict[str, str]] = {**DisagreementOptions.limits, "batch_size": ">= 1", "resolution": ">= 8"}


@register_source
class PromptSource(DiffusionSource, Source):
    name = "prompts"
    summary = 'SD-Turbo images of "a photo of a <class>" prompts (needs the SD-Turbo weights)'
    Options = PromptOptions
    needs_class_names = True

    def __init__(self, model, preprocess, class_names, *, sampler=None, diffusion: str | None = None, **kwargs):
        Source.__init__(self, model, preprocess, class_names, **kwargs)
        self._init_sampler(sampler, diffusion)

    def prepare(self, classes) -> None:
        self.sampler  # noqa: B018 - load the diffusion model before generating (errors come first)

    def prompts(self, labels: torch.Tensor, indices: torch.Tensor) -> list[str]:
        return [item_prompt(self.class_names[c], self.seed, c, i) for c, i in zip(labels.tolist(), indices.tolist())]

    def item_embeddings(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.sampler.encode_prompts(self.prompts(labels, indices))

    def describe(self) -> dict:
        return {**super().describe(), **self.diffusion_info()}
