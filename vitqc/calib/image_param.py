"""How ``--calib inversion`` parametrises the images it optimizes (``parameterization`` option).

Every parameterization is a linear map from its learnable tensors to an unconstrained "logit image" u
[B, C, H, W] followed by ``sigmoid`` (pixels stay in [0, 1]), and is initialised so that u starts at the
given u0 exactly. They differ only in how a gradient step moves the pixels:

``pixel``    u itself, coarse to fine: for the first part of the steps a 1/``coarse``-resolution image
             upsampled bilinearly, then the full-resolution one (the optimizer restarts at the switch).
``fourier``  u = irfft2(scale * S): the spectrum S is learned with each frequency's step scaled by
             1/f^``decay`` (as natural images' amplitude spectrum falls), so low frequencies move first and
             most; coarse to fine = only frequencies below 1/``coarse`` of Nyquist at first (after Lucid's
             ``fft_image``, Olah et al. 2017).

``decorrelate`` (either parameterization): the learned channels are decorrelated colour, u = M z with M
the square root of natural images' colour covariance (Lucid's ImageNet estimate), so a step moves
luminance and colour-opponent components rather than R, G and B independently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Lucid's color_correlation_svd_sqrt: the square root of ImageNet's RGB covariance (columns: luminance, two
# colour-opponent axes), normalised so its largest column has unit norm
_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOUR_MIX = _COLOUR_SQRT / _COLOUR_SQRT.norm(dim=0).max()

def _mix(z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ck,bkhw->bchw", matrix.to(z), z)


class ImageParam:
    """Learnable images: ``tensors()`` for the optimizer, ``images()`` in [0, 1] at full size,
    ``go_fine()`` at the end of the coarse stage (True when the tensors were replaced: restart the optimizer)."""

    def __init__(self, u0: torch.Tensor, decorrelate: bool):
        self.size = tuple(u0.shape[-2:])
        self.mix = COLOUR_MIX if decorrelate and u0.shape[1] == 3 else None

    def _to_u(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.mix is None else _mix(z, self.mix)

    def _from_u(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.mix is None else _mix(u, torch.linalg.inv(self.mix))

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def images(self) -> torch.Tensor:
        raise NotImplementedError

    def go_fine(self) -> bool:
        return False


class PixelParam(ImageParam):
    def __init__(self, u0: torch.Tensor, decorrelate: bool = False, coarse: int = 1):
        super().__init__(u0, decorrelate)
        z = self._from_u(u0)
        # coarse to fine: low frequencies first, as natural images have most of their energy there
        self.z = (F.interpolate(z, scale_factor=1 / coarse, mode="area") if coarse > 1 else z).detach().requires_grad_(True)

    def _full(self, t: torch.Tensor) -> torch.Tensor:
        return t if tuple(t.shape[-2:]) == self.size else F.interpolate(t, size=self.size, mode="bilinear",
                                                                          align_corners=False)

    def tensors(self) -> list[torch.Tensor]:
        return [self.z]

    def images(self) -> torch.Tensor:
        return self._full(torch.sigmoid(self._to_u(self.z)))  # (colour mixing is per pixel: it commutes with the resize)

    def go_fine(self) -> bool:
        if tuple(self.z.shape[-2:]) == self.size:
            return False
        self.z = self._full(self.z).detach().requires_grad_(True)
        return True


def spectrum_scale(h: int, w: int, decay: float) -> torch.Tensor:
    """1/f^decay over rfft2's frequency grid [h, w//2+1] (f floored at one cycle per image), normalised to
    unit RMS so that a learning rate moves pixels about as much as in ``pixel`` space."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    f = (fx * fx + fy * fy).sqrt().clamp_min(1.0 / max(h, w))
    scale = f.pow(-decay)
    return scale / scale.pow(2).mean().sqrt()


class FourierParam(ImageParam):
    def __init__(self, u0: torch.Tensor, decorrelate: bool = False, coarse: int = 1, decay: float = 1.0):
        super().__init__(u0, decorrelate)
        h, w = self.size
        self.scale = spectrum_scale(h, w, decay).to(u0.device)
        fy = torch.fft.fftfreq(h, device=u0.device)[:, None].abs()
        fx = torch.fft.rfftfreq(w, device=u0.device)[None, :]
        # the coarse stage keeps frequencies a 1/coarse-resolution image holds (Nyquist 0.5/coarse per axis)
        self.low = ((fy <= 0.5 / coarse) & (fx <= 0.5 / coarse)).float() if coarse > 1 else None
        spectrum = torch.fft.rfft2(self._from_u(u0), norm="ortho") / self.scale
        if self.low is not None:
            spectrum = spectrum * self.low
        self.s = torch.view_as_real(spectrum).detach().contiguous().requires_grad_(True)

    def tensors(self) -> list[torch.Tensor]:
        return [self.s]

    def images(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.s) * self.scale
        if self.low is not None:
            spectrum = spectrum * self.low
        return torch.sigmoid(self._to_u(torch.fft.irfft2(spectrum, s=self.size, norm="ortho")))

    def go_fine(self) -> bool:
        if self.low is None:
            return False
        self.low = None  # the higher frequencies start at zero (they were masked, never learned)
        return True


def make_param(kind: str, u0: torch.Tensor, decorrelate: bool, coarse: int, decay: float = 1.0) -> ImageParam:
    if kind == "pixel":
        return PixelParam(u0, decorrelate, coarse)
    if kind == "fourier":
        return FourierParam(u0, decorrelate, coarse, decay)
    raise ValueError(f"unknown parameterization {kind!r}")


def logit(pixels: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
    p = pixels.clamp(eps, 1 - eps)
    return torch.log(p / (1 - p))


__all__ = ["ImageParam", "PixelParam", "FourierParam", "make_param", "spectrum_scale", "logit",
           "COLOUR_MIX"]
