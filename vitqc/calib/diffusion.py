"""Stable Diffusion Turbo through diffusers, with an explicit one-step sampler that gradients flow through.

:func:`load_diffusion` loads the UNet, VAE, CLIP text encoder, tokenizer and the noise schedule from a hub id
(default ``stabilityai/sd-turbo``) or a local diffusers folder (``--diffusion PATH``): bf16 on a GPU, fp32 on
the CPU. Offline without the weights it raises a one-line :class:`~vitqc.errors.VitqcError` saying how to
provide them.

:class:`OneStepSampler` is the whole sampler, written out (no diffusers pipeline call): latents drawn at
sigma_max of the training schedule (timestep T-1 = 999, what SD-Turbo's one-step "trailing" schedule
starts from), one UNet call conditioned on the prompt embeddings, the x0 prediction (epsilon, v or sample
parametrisation, from the scheduler config), VAE decode to [0, 1], and a resize to the classifier's input
size with antialiasing. For one step, Euler and Euler-ancestral samplers both return exactly this x0.
Every op is differentiable, so a loss on the images reaches the prompt embeddings.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.errors import VitqcError

DEFAULT_DIFFUSION = "stabilityai/sd-turbo"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        import huggingface_hub.constants as c

        return bool(c.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def offline_message(spec: str) -> str:
    return (f"the diffusion model {spec} is not available here (offline, and not in the Hugging Face cache): "
            f"download it once while online (`hf download {spec}`), or pass --diffusion DIR with a local diffusers "
            f"copy (unet/, vae/, text_encoder/, tokenizer/, scheduler/); --calib inversion needs no diffusion model")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


DECODE_ELEMENTS_LIMIT = 2 ** 31 - 1  # the largest decoder activation one VAE call may make (32-bit indexing)


class OneStepSampler(nn.Module):
    """SD-Turbo's one-step text-to-image map, differentiable in the prompt embeddings."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", timestep: int | None = None,
                 resolution: int | None = None, source: str = ""):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        for module in (unet, vae, text_encoder):
            module.eval().requires_grad_(False)
        self.timestep = int(len(alphas_cumprod) - 1 if timestep is None else timestep)
        alpha = float(alphas_cumprod[self.timestep])
        self.sigma = math.sqrt((1 - alpha) / alpha)  # sigma_max of the Euler (k-diffusion) parametrisation
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise VitqcError(f"diffusion prediction type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")
        self.prediction_type = prediction_type
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        sample = unet.config.sample_size
        sample = sample if isinstance(sample, int) else int(sample[0])
        self.resolution = int(resolution or sample * self.vae_scale)
        if self.resolution % self.vae_scale:
            raise VitqcError(f"diffusion resolution {self.resolution} is not a multiple of the VAE's {self.vae_scale}")
        cfg = text_encoder.config
        limit = int(getattr(cfg, "max_position_embeddings", 77))
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        self.embed_dim = int(cfg.hidden_size)
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def enable_checkpointing(self) -> None:
        """Gradient checkpointing in the UNet and VAE (prompt learning at full resolution on a GPU)."""
        for module in (self.unet, self.vae):
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()  # applies whenever grad is enabled (eval mode too)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] (float32) for ``prompts``."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Unit Gaussian latents [B, C, h, w], one seeded draw per item (on the CPU, so seeds mean the same
        images on every device)."""
        h = self.resolution // self.vae_scale
        out = torch.empty(len(seeds), self.latent_channels, h, h)
        for k, seed in enumerate(seeds):
            out[k] = torch.randn(self.latent_channels, h, h, generator=torch.Generator().manual_seed(int(seed)))
        return out

    def forward(self, prompt_embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [0, 1] (float32) from prompt embeddings [B, L, D] and unit noise."""
        dtype, device = self.dtype, self.device
        sigma = self.sigma
        latents = noise.to(device, torch.float32) * sigma  # x_T at sigma_max
        model_input = latents / math.sqrt(sigma ** 2 + 1)  # the scheduler's scale_model_input
        out = self.unet(model_input.to(dtype), self.timestep,
                        encoder_hidden_states=prompt_embeds.to(device, dtype)).sample.float()
        if self.prediction_type == "epsilon":
            x0 = latents - sigma * out
        elif self.prediction_type == "v_prediction":
            x0 = out * (-sigma / math.sqrt(sigma ** 2 + 1)) + latents / (sigma ** 2 + 1)
        else:
            x0 = out
        cfg = self.vae.config
        z = x0 / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        # in chunks: CUDA kernels index with 32-bit ints, and at 512 px a batch of 32 makes decoder activations
        # of 2^31 elements and more (upsample_nearest's backward refuses them; seen on an H200)
        chunk = max(1, DECODE_ELEMENTS_LIMIT // (max(cfg.block_out_channels) * self.resolution ** 2))
        image = torch.cat([self.vae.decode(part).sample.float() for part in z.to(dtype).split(chunk)])
        return (image / 2 + 0.5).clamp(0, 1)


def resize_to(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of [0, 1] images to (H, W) (differentiable)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    mode = "bicubic" if interpolation in ("bicubic", "lanczos") else "bilinear"
    return F.interpolate(images, size=tuple(size), mode=mode, antialias=True, align_corners=False).clamp(0, 1)


def _quiet_loaders() -> None:
    """diffusers/transformers log and draw progress bars while loading: keep stderr to vitqc's own lines."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        import huggingface_hub.utils.logging as hlog

        hlog.set_verbosity_error()
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging helpers moved
        pass


def _load_components(src: str, dtype: torch.dtype, local: bool, variant: str | None, cache_only: bool = False):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: dict[str, Any] = {"local_files_only": True} if (local or cache_only or _offline()) else {}
    vkw = {"variant": variant} if variant else {}
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **vkw, **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **vkw, **kw)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **vkw, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    return unet, vae, text_encoder, tokenizer, scheduler


def check_spec(spec: str) -> bool:
    """Whether ``spec`` names a local folder (True) or a hub id (False); a path that is no folder is an error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return True
    if path.exists() or not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise VitqcError(f"--diffusion {spec}: no such directory; pass a local diffusers folder of SD-Turbo "
                         f"(unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id such as {DEFAULT_DIFFUSION}")
    return False


def load_diffusion(spec: str | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, resolution: int | None = None) -> OneStepSampler:
    """SD-Turbo (or another SD-style UNet/VAE/CLIP-text model) from a hub id or a local diffusers folder."""
    spec = str(spec or DEFAULT_DIFFUSION)
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = check_spec(spec)
    path = Path(spec).expanduser()
    src = str(path) if local else spec
    _quiet_loaders()

    def attempt(cache_only: bool):
        variant = "fp16" if (dtype != torch.float32 and not local) else None  # half the download
        with warnings.catch_warnings():  # deprecation chatter from the hub client inside diffusers
            warnings.simplefilter("ignore")
            try:
                return _load_components(src, dtype, local, variant, cache_only)
            except (OSError, ValueError) as e:
                if variant is None or ("variant" not in str(e).lower() and "fp16" not in str(e)):
                    raise
                return _load_components(src, dtype, local, None, cache_only)

    try:
        try:  # the Hugging Face cache first: no network round trips when the weights are already here
            parts = attempt(cache_only=True)
        except Exception:  # noqa: BLE001
            if local or _offline():
                raise
            parts = attempt(cache_only=False)
    except VitqcError:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one line
        if local:
            raise VitqcError(f"could not load a diffusion model from {path}: {_first_line(e)} (it needs the "
                             f"diffusers layout unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from None
        from vitqc.models import _is_network_error

        if _offline() or _is_network_error(e) or "local_files_only" in str(e) or "cache" in str(e).lower():
            raise VitqcError(offline_message(spec)) from None
        raise VitqcError(f"could not load the diffusion model {spec}: {_first_line(e)}") from None
    unet, vae, text_encoder, tokenizer, scheduler = parts
    sampler = OneStepSampler(unet, vae, text_encoder, tokenizer, scheduler.alphas_cumprod,
                             scheduler.config.prediction_type, resolution=resolution, source=spec)
    return sampler.to(device)


@dataclass
class DisagreementOptions:
    """Options of the diffusion sources' generation against a quantized student (data-free rounds of
    joint_optimize, :mod:`vitqc.calib.cyclic`): each new item's prompt embeddings and latent noise are
    optimized for ``refine_steps`` Adam steps so that the FP model reads the image as the item's class
    (``refine_w_ce``) while KL(FP || student) grows (``w_disagree``); ``refine_w_prior`` keeps the embeddings
    near their start (squared change relative to their variance) and the noise at unit variance."""

    refine_steps: int = 10
    refine_lr: float = 0.05
    refine_w_ce: float = 1.0
    w_disagree: float = 1.0
    refine_w_prior: float = 1.0
    limits: ClassVar[dict[str, str]] = {"refine_steps": ">= 0", "refine_lr": ">= 0", "refine_w_ce": ">= 0",
                                        "w_disagree": ">= 0", "refine_w_prior": ">= 0"}


class DiffusionSource:
    """Mixin for the text-guided sources: holds the sampler (built once, lazily) and turns (embeddings,
    item seeds) into model-sized images in generation batches. Subclasses give ``item_embeddings(labels,
    indices)`` (prompt embeddings [B, L, D] of each item)."""

    def _init_sampler(self, sampler: OneStepSampler | None, diffusion: str | None) -> None:
        if sampler is None:
            check_spec(str(diffusion or DEFAULT_DIFFUSION))  # a wrong path fails before any work
        self._sampler = sampler
        self._diffusion = diffusion

    @property
    def sampler(self) -> OneStepSampler:
        if self._sampler is None:
            self._sampler = load_diffusion(self._diffusion, device=self.device,
                                           resolution=getattr(self.options, "resolution", None))
        return self._sampler

    def render(self, embeds: torch.Tensor, seeds: Sequence[int] | None = None, grad: bool = False,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Model-sized images in [0, 1] (on the sampler's device) from embeddings and per-item noise seeds (or
        the unit ``noise`` itself)."""
        _, h, w = self.preprocess.input_size
        with torch.set_grad_enabled(grad):
            images = self.sampler(embeds, self.sampler.noise(seeds) if noise is None else noise)
            images = resize_to(images, (h, w), self.preprocess.interpolation)
            return self.to_model_channels(images)

    def item_seeds(self, labels: torch.Tensor, indices: torch.Tensor) -> list[int]:
        from vitqc.calib import item_seed

        return [item_seed(self.seed, c, i) for c, i in zip(labels.tolist(), indices.tolist())]

    def generate_batch(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.item_embeddings(labels, indices)
        return self.render(embeds.to(self.sampler.device), self.item_seeds(labels, indices)).float().cpu()

    def generate_disagreement(self, labels: torch.Tensor, indices: torch.Tensor, student: torch.nn.Module) -> torch.Tensor:
        """Images for items (labels, indices) whose prompt embeddings and latent noise were optimized against
        ``student`` (see :class:`DisagreementOptions`); [0, 1], on the CPU."""
        from vitqc.calib.features import forward, normalise
        from vitqc.calib.inversion import frozen, kl_disagreement

        o = self.options
        out = []
        with frozen(self.model, self.sampler.device) as model, frozen(student, self.sampler.device):
            for k in range(0, len(labels), self.batch_size):
                lab, idx = labels[k:k + self.batch_size], indices[k:k + self.batch_size]
                start = self.item_embeddings(lab, idx).to(self.sampler.device, torch.float32)
                noise0 = self.sampler.noise(self.item_seeds(lab, idx)).to(self.sampler.device)
                embeds, noise = start.clone().requires_grad_(True), noise0.clone().requires_grad_(True)
                spread = start.var().clamp_min(1e-8)
                targets = lab.to(self.sampler.device)
                opt = torch.optim.Adam([embeds, noise], lr=o.refine_lr)
                for _ in range(o.refine_steps):
                    with torch.enable_grad():
                        x = normalise(self.render(embeds, grad=True, noise=noise), self.preprocess)
                        teacher = forward(model, x, want_patches=False).logits
                        prior = (embeds - start).pow(2).mean() / spread + (noise.pow(2).mean((1, 2, 3)) - 1).pow(2).mean()
                        loss = (o.refine_w_ce * F.cross_entropy(teacher.float(), targets)
                                - o.w_disagree * kl_disagreement(teacher, student(x)) + o.refine_w_prior * prior)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    opt.step()
                out.append(self.render(embeds.detach(), noise=noise.detach()).float().cpu())
        return torch.cat(out)

    def diffusion_info(self) -> dict[str, Any]:
        s = self._sampler
        return {"diffusion": s.source if s is not None else (self._diffusion or DEFAULT_DIFFUSION),
                **({"resolution": s.resolution, "timestep": s.timestep} if s is not None else {})}
