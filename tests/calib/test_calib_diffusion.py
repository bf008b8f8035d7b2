"""The explicit one-step SD-Turbo sampler on a tiny pipeline built from config, the prompts baseline, and
the one-line errors when the weights cannot be had."""
import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.calib.diffusion import OneStepSampler, load_diffusion, resize_to
from vitqc.calib.prompts import PromptSource, class_prompt, item_prompt
from vitqc.data import Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NAMES = ["tench, Tinca tinca", "goldfish", "great white shark", "airplane", "egg"]


def test_loads_the_diffusers_layout(tiny_sampler):
    s = tiny_sampler
    assert isinstance(s, OneStepSampler)
    assert s.timestep == 999 and s.resolution == 16 and s.embed_dim == 32 and s.max_length == 16
    assert s.sigma == pytest.approx(14.6146, abs=1e-3)  # sigma_max of SD's scaled-linear schedule
    assert s.dtype == torch.float32  # bf16 only on a GPU


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_one_step_sampler_matches_diffusers_scheduler(tiny_sampler, tiny_sd_dir, scheduler):
    """Our explicit x0 equals what diffusers' scheduler gives for SD-Turbo's single trailing step."""
    import diffusers

    s = tiny_sampler
    sched = getattr(diffusers, scheduler).from_pretrained(tiny_sd_dir, subfolder="scheduler")
    sched.set_timesteps(1)
    embeds = s.encode_prompts(["a photo of a cat", "a photo of an egg"])
    noise = s.noise([1, 2])
    with torch.no_grad():
        ours = s(embeds, noise)
        t = sched.timesteps[0]
        latents = noise * sched.init_noise_sigma
        eps = s.unet(sched.scale_model_input(latents, t), t, encoder_hidden_states=embeds).sample
        x0 = sched.step(eps, t, latents, generator=torch.Generator().manual_seed(0)).prev_sample
        ref = (s.vae.decode(x0 / s.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert int(t) == 999
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_vae_decodes_in_chunks_below_the_32_bit_element_limit(tiny_sampler, monkeypatch):
    """A large batch is decoded in chunks (32-bit kernel indexing); the images are those of one big call."""
    import vitqc.calib.diffusion as diffusion

    s = tiny_sampler
    embeds, noise = s.encode_prompts(["a photo of a cat"] * 3), s.noise([5, 6, 7])
    calls = []
    decode = s.vae.decode
    monkeypatch.setattr(s.vae, "decode", lambda z: calls.append(len(z)) or decode(z))
    with torch.no_grad():
        whole = s(embeds, noise)
        monkeypatch.setattr(diffusion, "DECODE_ELEMENTS_LIMIT", max(s.vae.config.block_out_channels) * s.resolution ** 2)
        chunked = s(embeds, noise)
    assert calls == [3, 1, 1, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_prompt_embeddings(tiny_sampler):
    s = tiny_sampler
    embeds = s.encode_prompts(["a photo of a cat", "a photo of a dog"]).requires_grad_(True)
    images = resize_to(s(embeds, s.noise([3, 4])), (12, 12))
    model = tiny_vit(num_classes=3, img_size=12)
    loss = torch.nn.functional.cross_entropy(model((images - 0.5) / 0.5), torch.tensor([0, 1]))
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert torch.isfinite(embeds.grad).all()
    assert not any(p.grad is not None for p in s.unet.parameters())  # the diffusion model stays frozen


def test_resize_is_antialiased():
    stripes = torch.zeros(1, 3, 64, 64)
    stripes[..., ::2] = 1.0
    small = resize_to(stripes, (16, 16), "bilinear")
    assert small.shape == (1, 3, 16, 16)
    assert (small - 0.5).abs().max() < 0.05  # averaged, not aliased to all-0 or all-1


def test_prompt_text_baseline():
    assert class_prompt("tench, Tinca tinca") == "a photo of a tench"
    assert class_prompt("egg", "bright", "old") == "a bright photo of an old egg"
    p = item_prompt("great_white_shark", seed=0, label=2, index=5)
    assert p.startswith("a ") and " photo of " in p and p.endswith("great white shark")
    assert p == item_prompt("great_white_shark", seed=0, label=2, index=5)
    assert len({item_prompt("egg", 0, 4, i) for i in range(20)}) > 10  # adjectives vary across items


def test_prompt_source_generates_model_sized_images(tiny_sampler):
    src = PromptSource(tiny_vit(), Preprocess(input_size=(1, 12, 12), mean=(0.5,), std=(0.5,)), NAMES,
                       sampler=tiny_sampler, seed=0, device="cpu")
    labels, indices = torch.tensor([0, 3, 4]), torch.tensor([0, 1, 2])
    x = src.generate_batch(labels, indices)
    assert x.shape == (3, 1, 12, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(x[1:2], src.generate_batch(labels[1:2], indices[1:2]), atol=1e-5, rtol=0)  # per-item seeds
    assert src.describe()["source"] == "prompts" and src.describe()["resolution"] == 16


def test_missing_local_directory_is_one_line_error(tmp_path):
    with pytest.raises(VitqcError, match="no such directory") as info:
        load_diffusion(str(tmp_path / "no-sd-turbo"), device="cpu")
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitqcError, match="could not load a diffusion model from .*unet/"):
        load_diffusion(str(tmp_path / "empty"), device="cpu")


def test_offline_without_weights_says_how_to_provide_them(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = "stabilityai/sd-turbo"
    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "unet/config.json"), str):
        spec = "vitqc-tests/not-a-cached-model"  # this machine has SD-Turbo: ask for something it lacks
    with pytest.raises(VitqcError) as info:
        load_diffusion(spec, device="cpu")
    message = str(info.value)
    assert "\n" not in message and spec in message and "--diffusion DIR" in message and "hf download" in message


def test_cli_reports_missing_diffusion_weights_in_one_line(tmp_path, capsys):
    from vitqc.cli.main import main

    names = tmp_path / "names.txt"
    names.write_text("\n".join(str(d) for d in range(10)) + "\n")
    code = main(["compile", "demo", "--pipeline", "minmax-w8a8", "--calib", "prompts", "--class-names", str(names),
                 "--diffusion", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.vitqc")])
    err = capsys.readouterr().err
    assert code == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.vitqc").exists()
