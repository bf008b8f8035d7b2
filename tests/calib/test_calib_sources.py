"""The source registry, option parsing, the noise floor and model inversion (tiny timm ViT, CPU)."""
import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.calib import calibration_batches, generate, get_source, make_source, plan_items
from vitqc.calib.features import forward, normalise
from vitqc.calib.inversion import InversionSource, patch_contrastive_loss
from vitqc.calib.noise import noise_stats
from vitqc.calib.spec import parse_options
from vitqc.data import Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.15))
NAMES = [f"class_{i}" for i in range(5)]


def test_registry_and_options():
    assert get_source("noise").name == "noise" and get_source("inversion").name == "inversion"
    with pytest.raises(VitqcError, match="unknown calibration source"):
        get_source("dreams")
    with pytest.raises(VitqcError, match="has no option 'stepz'.*steps"):
        make_source("inversion", tiny_vit(), PRE, NAMES, stepz=3)
    src = make_source("inversion", tiny_vit(), PRE, NAMES, steps="7", flip="false")
    assert src.options.steps == 7 and src.options.flip is False
    # coerced as pass options are (vitqc.options.coerce_value): the same spellings, the same one-line errors
    assert make_source("noise", tiny_vit(), PRE, NAMES, mean=[0.5, 0.5, 0.5]).options.mean == (0.5, 0.5, 0.5)
    with pytest.raises(VitqcError, match="^--calib inversion option steps must be an integer, not 'many'$"):
        make_source("inversion", tiny_vit(), PRE, NAMES, steps="many")
    with pytest.raises(VitqcError, match="^--calib inversion option flip must be true or false, not 'perhaps'$"):
        make_source("inversion", tiny_vit(), PRE, NAMES, flip="perhaps")
    assert parse_options("inversion", "steps=5,lr=0.5", ["w_tv=0"]) == {"steps": 5, "lr": 0.5, "w_tv": 0}
    assert parse_options("noise", "mean=0.5/0.5/0.5", []) == {"mean": [0.5, 0.5, 0.5]}
    assert parse_options("learned-prompts", "out/emb.safetensors,steps=2", []) == {
        "embeddings": "out/emb.safetensors", "steps": 2}
    with pytest.raises(VitqcError, match="not KEY=VALUE"):
        parse_options("inversion", "fast", [])


def test_plan_is_class_balanced_and_seeded():
    items = plan_items(range(4), 3)
    assert items[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)] and len(items) == 12
    picked = plan_items(range(10), 1, seed=3, limit=4)
    assert len({c for c, _ in picked}) == 4 and picked == plan_items(range(10), 1, seed=3, limit=4)


def test_noise_source_statistics_and_determinism():
    batches = list(generate("noise", tiny_vit(), PRE, NAMES, per_class=40, seed=1))
    x = torch.cat([b for b, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert x.shape == (200, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert torch.bincount(labels).tolist() == [40] * 5
    mean, std = noise_stats(PRE)
    assert mean == PRE.mean and std == PRE.std  # a model's own normalisation is the default
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.tensor(mean), atol=0.02)
    # item (c, i) is the same image whatever batch it is generated in
    src = make_source("noise", tiny_vit(), PRE, NAMES, seed=1)
    one = src.generate_batch(torch.tensor([3]), torch.tensor([7]))
    assert torch.equal(one[0], src.generate_batch(torch.tensor([0, 3]), torch.tensor([0, 7]))[1])
    assert not torch.equal(one, make_source("noise", tiny_vit(), PRE, NAMES, seed=2).generate_batch(
        torch.tensor([3]), torch.tensor([7])))
    # identity normalisation (pixels in [0, 1]) falls back to ImageNet statistics
    ident = Preprocess(input_size=(3, 16, 16), mean=(0, 0, 0), std=(1, 1, 1))
    assert noise_stats(ident)[0] == (0.485, 0.456, 0.406)


def test_patch_contrastive_prefers_consistent_images():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 1, 32, generator=g)
    consistent = base + 0.05 * torch.randn(4, 16, 32, generator=g)  # tokens of an image agree, images differ
    mixed = torch.randn(4, 16, 32, generator=g)
    assert patch_contrastive_loss(consistent, generator=torch.Generator().manual_seed(1)) < \
        patch_contrastive_loss(mixed, generator=torch.Generator().manual_seed(1))
    assert patch_contrastive_loss(torch.randn(1, 16, 32)) == 0  # no other image, no negatives


def test_inversion_loss_falls_and_beats_noise_on_target_confidence():
    from vitqc import demo

    model, pre = demo.load_demo_model(), demo.demo_preprocess()  # a trained ViT (digits, 1 x 8 x 8)
    names = [str(d) for d in range(10)]
    src = InversionSource(model, pre, names, seed=0, device="cpu", steps=40, lr=0.2, batch_size=20, w_ce=1.0, coarse=1)
    labels, indices = torch.arange(20) % 10, torch.arange(20) // 10
    history = []
    images = src.optimize(labels, indices, history=history)
    assert images.shape == (20, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    assert history[-1]["patch"] > 0  # the patch-contrastive term is active on a timm ViT

    def confidence(x):
        with torch.no_grad():
            return model(normalise(x, pre)).softmax(-1).gather(1, labels[:, None]).mean().item()

    noise = make_source("noise", model, pre, names, seed=0).generate_batch(labels, indices)
    assert confidence(images) > confidence(noise) + 0.4, (confidence(images), confidence(noise))
    assert src.stats["target_confidence"] == pytest.approx(confidence(images), abs=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # the model is given back as it was


def test_coarse_to_fine_inversion_optimizes_low_resolution_first():
    import torch.nn.functional as F

    from vitqc.calib.inversion import coarse_factor

    model = tiny_vit()  # patch 4: the coarse factor is capped at 2
    assert coarse_factor(model, 4) == 2 and coarse_factor(model, 1) == 1 and coarse_factor(torch.nn.Linear(2, 2), 4) == 4
    labels, indices = torch.arange(4), torch.zeros(4, dtype=torch.long)

    def run(**options):
        src = InversionSource(model, PRE, NAMES, seed=0, device="cpu", steps=6, batch_size=4, **{"coarse": 1, **options})
        history = []
        return src.optimize(labels, indices, history=history), history

    def low_pass(x):
        return F.interpolate(F.interpolate(x, scale_factor=0.5, mode="area"), size=(16, 16), mode="bilinear",
                             align_corners=False)

    fine, _ = run()
    coarse_only, history = run(coarse=4, coarse_fraction=1.0)  # every step at 8 x 8, upsampled at the end
    assert coarse_only.shape == fine.shape == (4, 3, 16, 16) and len(history) == 6
    smooth = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert smooth(coarse_only) < 0.7 * smooth(fine), (smooth(coarse_only), smooth(fine))
    assert (coarse_only - low_pass(coarse_only)).abs().max() < (fine - low_pass(fine)).abs().max()
    half, history = run(coarse=2)  # 3 steps at 8 x 8, then 3 at full resolution
    assert half.shape == fine.shape and len(history) == 6 and not torch.equal(half, fine)
    assert torch.equal(run()[0], fine)  # coarse = 1 is the plain optimization, deterministic


def test_features_of_timm_vit_and_of_a_hooked_module():
    model = tiny_vit()
    x = normalise(torch.rand(2, 3, 16, 16), PRE)
    out = forward(model, x)
    assert out.logits.shape == (2, 5) and out.patches.shape == (2, 16, 32) and out.pooled.shape == (2, 32)

    class Wrapped(torch.nn.Module):  # no forward_features: patch tokens come from a hook on blocks[-1]
        def __init__(self):
            super().__init__()
            self.inner, self.blocks = model, model.blocks

        def forward(self, x):
            return self.inner(x)

    hooked = forward(Wrapped(), x)
    assert torch.allclose(hooked.logits, out.logits)
    assert hooked.patches.shape[1] in (16, 17)


def test_calibration_batches_are_normalised_for_compile():
    batches, info = calibration_batches("noise", tiny_vit(), PRE, NAMES, size=12, seed=0, batch_size=5, quiet=True)
    assert [len(b) for b in batches] == [5, 5, 2]
    x = torch.cat(batches)
    assert x.min() < -0.5  # normalised with the model's mean/std, not [0, 1]
    assert info["source"] == "noise" and info["classes"] == 5
