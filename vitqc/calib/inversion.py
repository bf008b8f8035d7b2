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

Options that change what a step sees, each measured in benchmarks/results/calib_sources_ablations*.json:
``parameterization`` / ``decorrelate`` / ``decay`` (how the images are parametrised:
:mod:`vitqc.calib.image_param`), ``views`` (an augmentation ensemble: each step scores ``views`` augmented
copies of every image, whose patches are all positives of one another in the contrastive loss) and
``w_pse`` (PSAQ-ViT's patch similarity entropy: the entropy of the distribution of cosine similarities
between an image's patch tokens, which real images spread wide and noise does not, is maximised).

:meth:`InversionSource.generate_disagreement` is the generation half of the cyclic loop
(:mod:`vitqc.calib.cyclic`): the same objective minus ``w_disagree`` times KL(FP || quantized student), so the
new images are ones the FP model still reads as its class but the student does not yet agree on.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from vitqc.calib import Source, item_seed
from vitqc.calib.spec import register_source
from vitqc.calib.features import forward, normalise
from vitqc.calib.image_param import logit, make_param
from vitqc.calib.noise import noise_stats


# Defaults tuned on vits14_cifar10 (the sweep: docs/findings.md, "Model inversion";
# benchmarks/results/calib_sources_vits14_inv_*.json): confident, high-frequency images distill worst, so a weak
# class term and coarse pixels; more steps did not help.
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
    parameterization: Literal["pixel", "fourier"] = "pixel"  # see vitqc.calib.image_param
    decorrelate: bool = False  # learn decorrelated colour instead of R, G, B
    decay: float = 1.0  # fourier: a frequency f's step is scaled by 1/f^decay
    views: int = 1  # augmented copies of each image scored per step (an augmentation ensemble)
    w_pse: float = 0.0  # patch similarity entropy (PSAQ-ViT), maximised
    w_disagree: float = 1.0  # cyclic rounds only: weight of KL(FP || quantized student), maximised
    limits: ClassVar[dict[str, str]] = {
        "steps": ">= 0", "lr": ">= 0", "batch_size": ">= 1", "w_ce": ">= 0", "w_patch": ">= 0", "w_tv": ">= 0",
        "w_l2": ">= 0", "temperature": "> 0", "patches_per_image": ">= 1", "crop_scale": "0.05 to 1", "jitter": "0 to 1",
        "init_std": ">= 0", "coarse": ">= 1", "coarse_fraction": "0 to 1", "decay": ">= 0", "views": ">= 1",
        "w_pse": ">= 0", "w_disagree": ">= 0"}


def patch_contrastive_loss(patches: torch.Tensor, temperature: float = 0.2, per_image: int = 16,
                           generator: torch.Generator | None = None, owners: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised-contrastive (InfoNCE) loss over patch tokens [B, P, C]: for every sampled token, the other
    sampled tokens of the same image are positives and all tokens of other images are negatives. ``owners``
    [B] says which rows are views of one image (default: every row its own image)."""
    b, p, c = patches.shape
    m = min(per_image, p)
    owners = torch.arange(b) if owners is None else owners
    if len(set(owners.tolist())) < 2 or m < 2:
        return patches.new_zeros(())
    idx = torch.stack([torch.randperm(p, generator=generator)[:m] for _ in range(b)]).to(patches.device)
    z = F.normalize(torch.gather(patches, 1, idx[..., None].expand(-1, -1, c)).float(), dim=-1).reshape(b * m, c)
    sim = z @ z.t() / temperature
    owner = owners.to(z.device).repeat_interleave(m)
    eye = torch.eye(b * m, dtype=torch.bool, device=z.device)
    positive = (owner[:, None] == owner[None, :]) & ~eye
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(eye, 0.0)
    return (-(log_prob * positive).sum(1) / positive.sum(1)).mean()


def patch_similarity_entropy(patches: torch.Tensor, bandwidth: float = 0.05, bins: int = 128) -> torch.Tensor:
    """PSAQ-ViT's patch similarity entropy, averaged over images: the differential entropy of the cosine
    similarities between distinct patch tokens [B, P, C] of each image, from a Gaussian kernel density
    estimate on ``bins`` points of [-1, 1]."""
    b, p, _ = patches.shape
    if p < 2:
        return patches.new_zeros(())
    z = F.normalize(patches.float(), dim=-1)
    pairs = torch.triu_indices(p, p, offset=1, device=z.device)
    sims = (z @ z.transpose(1, 2))[:, pairs[0], pairs[1]]  # [B, P(P-1)/2]
    grid = torch.linspace(-1, 1, bins, device=z.device)
    density = torch.exp(-0.5 * ((grid[None, :, None] - sims[:, None, :]) / bandwidth) ** 2).mean(-1)
    density = density / (density.sum(-1, keepdim=True) * (2.0 / (bins - 1)))  # integrates to 1 on the grid
    return -(density * density.clamp_min(1e-12).log()).sum(-1).mul(2.0 / (bins - 1)).mean()


def kl_disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes, per image, averaged (what joint_optimize minimises)."""
    t, s = teacher_logits.float().log_softmax(-1), student_logits.float().log_softmax(-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


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


def inversion_loss(model, preprocess, images01, labels, options: InversionOptions, generator: torch.Generator,
                   student: torch.nn.Module | None = None):
    """(total loss, parts dict, logits on the augmented batch) for one optimization step. With ``student``
    (a quantized graph taking normalised images), ``w_disagree`` times KL(FP || student) is subtracted."""
    b = len(images01)
    x = torch.cat([augment(images01, generator, options.crop_scale, options.flip, options.jitter)
                   for _ in range(options.views)])
    x = normalise(x.clamp(0, 1), preprocess)
    out = forward(model, x, want_patches=options.w_patch > 0 or options.w_pse > 0)
    targets = labels.repeat(options.views)
    ce = F.cross_entropy(out.logits.float(), targets)
    zero = ce.new_zeros(())
    have_patches = out.patches is not None
    patch = (patch_contrastive_loss(out.patches, options.temperature, options.patches_per_image, generator,
                                    owners=torch.arange(b).repeat(options.views))
             if have_patches and options.w_patch > 0 else zero)
    pse = patch_similarity_entropy(out.patches) if have_patches and options.w_pse > 0 else zero
    disagree = kl_disagreement(out.logits, student(x)) if student is not None else zero
    tv = total_variation(images01)
    l2 = normalise(images01, preprocess).pow(2).mean()
    total = (options.w_ce * ce + options.w_patch * patch - options.w_pse * pse + options.w_tv * tv
             + options.w_l2 * l2 - options.w_disagree * disagree)
    parts = {"ce": ce.item(), "patch": patch.item(), "pse": pse.item(), "disagree": disagree.item(),
             "tv": tv.item(), "l2": l2.item()}
    return total, parts, out.logits


def coarse_factor(model: torch.nn.Module, coarse: int) -> int:
    """``coarse``, capped at half the model's patch size (timm ``patch_embed.patch_size``) so that a patch
    still sees at least 2 x 2 coarse pixels: one coarse pixel per patch hurt where a coarser image helped
    (docs/findings.md, "Model inversion"; benchmarks/results/calib_sources_vit_tiny_joint_inv_*.json)."""
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
        return logit(pixels)

    def optimize(self, labels: torch.Tensor, indices: torch.Tensor, steps: int | None = None,
                 history: list | None = None, student: torch.nn.Module | None = None) -> torch.Tensor:
        """Run the optimization for one batch; returns [0, 1] images on the CPU. ``history`` (a list) gets
        the per-step loss parts; ``student`` adds the disagreement term (see :func:`inversion_loss`)."""
        o = self.options
        steps = o.steps if steps is None else steps
        generator = torch.Generator().manual_seed(item_seed(self.seed, int(labels[0]), int(indices[0])) ^ len(labels))
        factor = coarse_factor(self.model, o.coarse)
        coarse_steps = round(o.coarse_fraction * steps) if factor > 1 else 0
        param = make_param(o.parameterization, self._init_logits(labels, indices).to(self.device), o.decorrelate,
                           factor if coarse_steps else 1, o.decay)
        targets = labels.to(self.device)
        schedule = lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))  # noqa: E731
        with contextlib.ExitStack() as stack, torch.enable_grad():
            model = stack.enter_context(frozen(self.model, self.device))
            if student is not None:
                student = stack.enter_context(frozen(student, self.device))
            for step in range(steps):
                if step == 0 or (step == coarse_steps and param.go_fine()):  # (re)start Adam on the new tensors
                    opt = torch.optim.Adam(param.tensors(), lr=o.lr, betas=(0.5, 0.99))
                for group in opt.param_groups:
                    group["lr"] = o.lr * schedule(step)
                loss, parts, _ = inversion_loss(model, self.preprocess, param.images(), targets, o, generator, student)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if history is not None:
                    history.append({"loss": loss.item(), **parts})
            param.go_fine()
            with torch.no_grad():
                images = param.images()
                probs = forward(model, normalise(images, self.preprocess), want_patches=False).logits.float().softmax(-1)
                confidence = probs.gather(1, targets[:, None]).mean()
        n = self.stats.get("images", 0)
        self.stats["images"] = n + len(labels)
        self.stats["target_confidence"] = round(
            (self.stats.get("target_confidence", 0.0) * n + float(confidence) * len(labels)) / (n + len(labels)), 4)
        return images.detach().float().cpu()

    def generate_batch(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.optimize(labels, indices)

    def generate_disagreement(self, labels: torch.Tensor, indices: torch.Tensor, student: torch.nn.Module) -> torch.Tensor:
        """Images for items (labels, indices) optimized from their noise to be read as their class by the FP
        model (with the usual patch-contrastive and image priors) while KL(FP || ``student``) grows."""
        return torch.cat([self.optimize(labels[k:k + self.batch_size], indices[k:k + self.batch_size], student=student)
                          for k in range(0, len(labels), self.batch_size)])
