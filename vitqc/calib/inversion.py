"""``--calib inversion``: images optimized from noise against the FP ViT (seeded after CLAMP-ViT).

A batch of images is parametrised in pixel space as ``sigmoid(z)`` (so every pixel stays in [0, 1]),
initialised from the noise source's draw for each item, and optimized with Adam, coarse to fine: the first
``coarse_fraction`` of the steps optimize a ``1/coarse``-resolution image upsampled bilinearly, the rest the
full-resolution one (smooth, natural-looking low frequencies first). Each step the batch is
augmented (random resized crop, horizontal flip, brightness/contrast jitter), normalised with the model's
mean/std exactly as :class:`~vitqc.data.Preprocess` does, and passed through the FP model. The loss is

* cross-entropy to the item's class target (weak by default: see the tuning note on the options),
* a patch-level contrastive loss (InfoNCE / supervised-contrastive over patch tokens of the last block:
  tokens of the same image are positives, tokens of the other images in the batch are negatives), which
  asks every part of an image to carry the same semantics and different images to differ,
* a small image prior: total variation of the pixels and L2 of the normalised input.

Patch tokens come from ``forward_features`` for timm ViT/DeiT (or a hook on the last block, see
:mod:`vitqc.calib.features`); a model without them is inverted with the class and prior terms only.
The batch is optimized jointly (the contrastive term couples its images), so an image depends on the
batch it was generated in; the initial noise and the augmentation draws are seeded from the items.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vitqc.calib import Source, item_seed
from vitqc.calib.spec import register_source
from vitqc.calib.features import forward, normalise
from vitqc.calib.noise import noise_stats


# Defaults tuned on vits14_cifar10 (joint-w4a4, 60 iterations at batch 8, 64 images, 2,000 test images;
# benchmarks/results/calib_sources_vits14_inv_*.json): 40 steps at the former w_ce 1 and full resolution gave
# 43.35 % top-1, these 48.30 % (real images 59.40 %). On 500 test images: 80 steps 45.2 % vs 40 steps 47.8 %,
# w_ce 0 41.4 %, w_ce 0.05 without coarse 38.4 %: confident, high-frequency images distill worst. (The former
# default of 200 steps was not better: 100 steps matched 40 on an earlier run.)
@dataclass
class InversionOptions:
    steps: int = 40
    lr: float = 0.1
    batch_size: int = 64
    w_ce: float = 0.05  # a weak class term: images the FP model is sure of carry little in its logits
    w_patch: float = 0.5  # patch-contrastive weight
    w_tv: float = 0.05  # total variation of the [0, 1] pixels
    w_l2: float = 1e-3  # mean square of the normalised input
    temperature: float = 0.2
    patches_per_image: int = 16  # tokens sampled per image for the contrastive loss
    crop_scale: float = 0.7  # random resized crop keeps a side fraction in [crop_scale, 1]
    flip: bool = True
    jitter: float = 0.1  # brightness/contrast jitter amplitude
    init_std: float = 1.0  # scale of the initial noise around its mean (1 = the noise source's draw)
    coarse: int = 4  # > 1: the first coarse_fraction of the steps optimize images at 1/coarse resolution
    # (capped at half the patch size: see coarse_factor)
    coarse_fraction: float = 0.5
    limits: ClassVar[dict[str, str]] = {
        "steps": ">= 0", "lr": ">= 0", "batch_size": ">= 1", "w_ce": ">= 0", "w_patch": ">= 0", "w_tv": ">= 0",
        "w_l2": ">= 0", "temperature": "> 0", "patches_per_image": ">= 1", "crop_scale": "0.05 to 1", "jitter": "0 to 1",
        "init_std": ">= 0", "coarse": ">= 1", "coarse_fraction": "0 to 1"}


def patch_contrastive_loss(patches: torch.Tensor, temperature: float = 0.2, per_image: int = 16,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Supervised-contrastive (InfoNCE) loss over patch tokens [B, P, C]: for every sampled token, the other
    sampled tokens of the same image are positives and all tokens of other images are negatives."""
    b, p, c = patches.shape
    m = min(per_image, p)
    if b < 2 or m < 2:
        return patches.new_zeros(())
    idx = torch.stack([torch.randperm(p, generator=generator)[:m] for _ in range(b)]).to(patches.device)
    z = F.normalize(torch.gather(patches, 1, idx[..., None].expand(-1, -1, c)).float(), dim=-1).reshape(b * m, c)
    sim = z @ z.t() / temperature
    owner = torch.arange(b, device=z.device).repeat_interleave(m)
    eye = torch.eye(b * m, dtype=torch.bool, device=z.device)
    positive = (owner[:, None] == owner[None, :]) & ~eye
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(eye, 0.0)
    return (-(log_prob * positive).sum(1) / positive.sum(1)).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def augment(x: torch.Tensor, generator: torch.Generator, crop_scale: float, flip: bool, jitter: float) -> torch.Tensor:
    """Differentiable per-image random resized crop (+ flip) and brightness/contrast jitter of [0, 1] images."""
    b = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    if crop_scale < 1.0 or flip:
        scale = crop_scale + (1.0 - crop_scale) * rand(b)
        shift = (1.0 - scale)[:, None] * (2 * rand(b, 2) - 1)
        sign = torch.where(rand(b) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=x.device)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = scale * sign
        theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        brightness = 1 + jitter * (2 * rand(b, 1, 1, 1) - 1)
        contrast = 1 + jitter * (2 * rand(b, 1, 1, 1) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * brightness
    return x


@contextlib.contextmanager
def frozen(model: torch.nn.Module, device: torch.device):
    """``model`` in eval mode on ``device`` with parameters not requiring grad; restored afterwards."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    home = params[0].device if params else device
    model.eval().requires_grad_(False).to(device)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training).to(home)


def inversion_loss(model, preprocess, images01, labels, options: InversionOptions, generator: torch.Generator):
    """(total loss, parts dict, logits on the augmented batch) for one optimization step."""
    x = augment(images01, generator, options.crop_scale, options.flip, options.jitter)
    x = normalise(x.clamp(0, 1), preprocess)
    out = forward(model, x, want_patches=options.w_patch > 0)
    ce = F.cross_entropy(out.logits.float(), labels)
    patch = (patch_contrastive_loss(out.patches, options.temperature, options.patches_per_image, generator)
             if out.patches is not None and options.w_patch > 0 else ce.new_zeros(()))
    tv = total_variation(images01)
    l2 = normalise(images01, preprocess).pow(2).mean()
    total = options.w_ce * ce + options.w_patch * patch + options.w_tv * tv + options.w_l2 * l2
    parts = {"ce": ce.item(), "patch": patch.item(), "tv": tv.item(), "l2": l2.item()}
    return total, parts, out.logits


def coarse_factor(model: torch.nn.Module, coarse: int) -> int:
    """``coarse``, capped at half the model's patch size (timm ``patch_embed.patch_size``) so that a patch
    still sees at least 2 x 2 coarse pixels. Measured: factor 4 at patch 14 (vits14_cifar10, 112 px) +4.95 pp;
    factor 4 at patch 4 (vit_tiny_cifar10, 32 px: one coarse pixel per patch) 52.45 % against 54.40 % at full
    resolution, capped to 2 there 55.10 % (benchmarks/results/calib_sources_vit_tiny_joint_inv_*.json)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return max(1, coarse)
    side = min(patch) if isinstance(patch, (tuple, list)) else int(patch)
    return max(1, min(coarse, side // 2))


@register_source
class InversionSource(Source):
    name = "inversion"
    summary = "images optimized from noise against the FP model (class targets + patch contrast); no weights needed"
    Options = InversionOptions

    def _init_logits(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        c, h, w = self.preprocess.input_size
        mean, std = noise_stats(self.preprocess)
        m, s = torch.tensor(mean).view(c, 1, 1), torch.tensor(std).view(c, 1, 1)
        pixels = torch.stack([
            (m + self.options.init_std * s * torch.randn(c, h, w, generator=self.item_generator(int(l), int(i))))
            for l, i in zip(labels.tolist(), indices.tolist())])
        pixels = pixels.clamp(0.02, 0.98)
        return torch.log(pixels / (1 - pixels))

    def optimize(self, labels: torch.Tensor, indices: torch.Tensor, steps: int | None = None,
                 history: list | None = None) -> torch.Tensor:
        """Run the optimization for one batch; returns [0, 1] images on the CPU. ``history`` (a list) gets
        the per-step loss parts."""
        o = self.options
        steps = o.steps if steps is None else steps
        generator = torch.Generator().manual_seed(item_seed(self.seed, int(labels[0]), int(indices[0])) ^ len(labels))
        z = self._init_logits(labels, indices).to(self.device)
        size = tuple(z.shape[-2:])
        factor = coarse_factor(self.model, o.coarse)
        coarse_steps = round(o.coarse_fraction * steps) if factor > 1 else 0
        if coarse_steps:  # coarse to fine: low frequencies first, as natural images have most of their energy there
            z = F.interpolate(z, scale_factor=1 / factor, mode="area")
        targets = labels.to(self.device)
        full = lambda t: t if t.shape[-2:] == size else F.interpolate(  # noqa: E731
            t, size=size, mode="bilinear", align_corners=False)
        schedule = lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))  # noqa: E731
        with frozen(self.model, self.device) as model, torch.enable_grad():
            for step in range(steps):
                if step in (0, coarse_steps):  # (re)start Adam: on the coarse image, then on its upsampling
                    z = (full(z) if step else z).detach().requires_grad_(True)
                    opt = torch.optim.Adam([z], lr=o.lr, betas=(0.5, 0.99))
                for group in opt.param_groups:
                    group["lr"] = o.lr * schedule(step)
                loss, parts, _ = inversion_loss(model, self.preprocess, full(torch.sigmoid(z)), targets, o, generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if history is not None:
                    history.append({"loss": loss.item(), **parts})
            z = full(z.detach())
            with torch.no_grad():
                images = torch.sigmoid(z)
                probs = forward(model, normalise(images, self.preprocess), want_patches=False).logits.float().softmax(-1)
                confidence = probs.gather(1, targets[:, None]).mean()
        n = self.stats.get("images", 0)
        self.stats["images"] = n + len(labels)
        self.stats["target_confidence"] = round(
            (self.stats.get("target_confidence", 0.0) * n + float(confidence) * len(labels)) / (n + len(labels)), 4)
        return images.detach().float().cpu()

    def generate_batch(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.optimize(labels, indices)
