"""Image parameterizations of model inversion, the augmentation ensemble and the patch similarity entropy."""
import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.calib import make_source
from vitqc.calib.image_param import COLOUR_MIX, FourierParam, PixelParam, logit, make_param, spectrum_scale
from vitqc.calib.inversion import patch_contrastive_loss, patch_similarity_entropy
from vitqc.data import Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.15))
NAMES = [f"class_{i}" for i in range(5)]


def _u0(seed=0, shape=(2, 3, 16, 16)):
    return logit(torch.rand(*shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("kind", ["pixel", "fourier"])
@pytest.mark.parametrize("decorrelate", [False, True])
def test_every_parameterization_starts_at_the_given_image(kind, decorrelate):
    u0 = _u0()
    param = make_param(kind, u0, decorrelate, coarse=1)
    torch.testing.assert_close(param.images(), torch.sigmoid(u0), atol=1e-5, rtol=0)
    assert not param.go_fine()  # nothing coarse to leave


def test_coarse_stages_hold_only_low_frequencies_until_go_fine():
    u0 = _u0()
    pixel = PixelParam(u0, coarse=4)
    assert pixel.z.shape[-2:] == (4, 4) and pixel.images().shape[-2:] == (16, 16)
    assert pixel.go_fine() and pixel.z.shape[-2:] == (16, 16)
    fourier = FourierParam(u0, coarse=4)
    low = torch.fft.rfft2(torch.logit(fourier.images().clamp(1e-6, 1 - 1e-6)), norm="ortho")
    fy = torch.fft.fftfreq(16).abs()[:, None]
    fx = torch.fft.rfftfreq(16)[None, :]
    assert low[..., (fy > 0.125) | (fx > 0.125)].abs().max() < 1e-3  # nothing above 1/4 of Nyquist
    assert fourier.go_fine()  # the high frequencies join (the optimizer restarts)
    s = fourier.s.detach().clone()
    fourier.s.data[..., 7, 7, :] += 1.0  # a high frequency now reaches the image
    assert not torch.equal(fourier.images(), FourierParam(u0).images()) and not torch.equal(fourier.s, s)


def test_fourier_steps_favour_low_frequencies_and_decorrelation_is_invertible():
    scale = spectrum_scale(16, 16, decay=1.0)
    assert scale.pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert scale[0, 0] == scale[0, 1] > scale[0, 2] > scale[0, 8] and scale[8, 8] < scale[1, 1]  # floored at 1 cycle
    assert torch.linalg.cond(COLOUR_MIX) < 20
    assert COLOUR_MIX.norm(dim=0).max().item() == pytest.approx(1.0)
    # one gradient step of equal size moves a smooth image in fourier space, a noisy one in pixel space
    u0 = torch.zeros(1, 3, 16, 16)
    for kind, smoother in (("fourier", True), ("pixel", False)):
        param = make_param(kind, u0, False, 1)
        target = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.Adam(param.tensors(), lr=0.1)
        (param.images() - target).pow(2).sum().backward()
        opt.step()
        change = param.images().detach() - 0.5
        roughness = (change[..., 1:] - change[..., :-1]).abs().mean() / change.abs().mean()
        assert (roughness < 0.9) == smoother, (kind, float(roughness))


def test_patch_similarity_entropy_is_higher_for_varied_patches():
    g = torch.Generator().manual_seed(0)
    varied = torch.randn(2, 16, 8, generator=g)
    alike = torch.randn(2, 1, 8, generator=g).expand(-1, 16, -1) + 0.01 * torch.randn(2, 16, 8, generator=g)
    assert patch_similarity_entropy(varied) > patch_similarity_entropy(alike) + 1.0
    x = varied.clone().requires_grad_(True)
    patch_similarity_entropy(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_views_of_one_image_are_positives_in_the_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 6, 8, generator=g)
    views = torch.cat([base, base + 0.01 * torch.randn(3, 6, 8, generator=g)])
    owners = torch.arange(3).repeat(2)
    with_owners = patch_contrastive_loss(views, per_image=6, generator=torch.Generator().manual_seed(1), owners=owners)
    as_strangers = patch_contrastive_loss(views, per_image=6, generator=torch.Generator().manual_seed(1))
    assert with_owners < as_strangers  # near-copies as negatives would be penalised


def test_inversion_options_reach_the_loss():
    model = tiny_vit()
    history = []
    src = make_source("inversion", model, PRE, NAMES, seed=0, device="cpu", quiet=True, steps=3,
                      parameterization="fourier", decorrelate=True, views=2, w_pse=0.5)
    x = src.optimize(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), history=history)
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert all(h["pse"] > 0 for h in history) and all(h["disagree"] == 0 for h in history)
    with pytest.raises(VitqcError, match="parameterization must be one of 'pixel', 'fourier', not 'wavelet'"):
        make_source("inversion", model, PRE, NAMES, parameterization="wavelet")
