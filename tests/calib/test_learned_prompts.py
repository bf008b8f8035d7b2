"""Learned multi-mode prompts on the tiny SD pipeline: the loss falls, the diversity terms do what they
say, embeddings are saved and reused."""
import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.calib import item_seed
from vitqc.calib.learned_prompts import LearnedPromptSource, diversity_loss, pairwise_similarity
from vitqc.data import Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NAMES = ["cat", "dog", "airplane", "egg", "ship"]


def classifier():
    """A random tiny ViT whose head is not near zero, so its logits respond to the images."""
    model = tiny_vit(num_classes=5)
    torch.manual_seed(1)
    model.head.weight.data.normal_(0, 0.5)
    return model


def source(sampler, **options):
    opts = dict(modes=2, steps=12, lr=0.05, classes_per_step=3, w_emb=1.0, w_feat=0.5, batch_size=4)
    opts.update(options)
    return LearnedPromptSource(classifier(), PRE, NAMES, sampler=sampler, seed=0, device="cpu", quiet=True, **opts)


def test_diversity_loss_is_zero_for_orthogonal_and_one_for_identical():
    eye = torch.eye(4).reshape(1, 4, 2, 2)  # 4 mutually orthogonal "embeddings" of one class
    assert diversity_loss(eye) == 0 and pairwise_similarity(eye) == 0
    same = torch.ones(2, 3, 5)
    assert diversity_loss(same) == pytest.approx(1.0)
    anchor = torch.randn(1, 4)
    offsets = torch.eye(4)[None] + anchor[:, None]  # orthogonal offsets from the anchor
    assert diversity_loss(offsets, anchor) == pytest.approx(0.0, abs=1e-6)
    assert diversity_loss(torch.randn(3, 1, 8)) == 0  # one mode: nothing to compare


def test_descending_the_diversity_loss_lowers_pairwise_similarity():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 1, 64, generator=g) + 0.3 * torch.randn(2, 4, 64, generator=g)).requires_grad_(True)
    before = pairwise_similarity(x).item()
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        diversity_loss(x).backward()
        opt.step()
    assert before > 0.8 and abs(pairwise_similarity(x).item()) < 0.2
    assert diversity_loss(x).item() < 0.05


def test_learned_prompt_loss_falls(text_sampler):
    src = source(text_sampler, lr=1.0, steps=12)
    classes = [0, 1, 2]
    anchors = src.anchors(classes)
    seeds = [item_seed(123, c, m) for c in classes for m in range(2)]  # held-out noise, the same before/after
    with torch.no_grad():
        before, parts_before = src.loss(src.initial_embeddings(classes, anchors), anchors, classes, seeds)
    learned = src.learn(classes)
    with torch.no_grad():
        after, parts_after = src.loss(torch.stack([learned[c] for c in classes]), anchors, classes, seeds)
    assert parts_after["ce"] < 0.95 * parts_before["ce"], (parts_before, parts_after)
    assert after < before
    ce = [h["ce"] for h in src.history]
    assert len(ce) == 12 and sum(ce[-3:]) < sum(ce[:3])
    assert src.stats["learn_classes"] == 3 and src.stats["learn_seconds_per_class"] > 0


def test_embedding_diversity_term_keeps_modes_apart(text_sampler):
    classes = [0, 1, 2]
    sims = {}
    for w in (0.0, 20.0):
        src = source(text_sampler, w_emb=w, w_feat=0.0, steps=8, lr=1.0)
        learned = src.learn(classes)
        sims[w] = diversity_loss(torch.stack([learned[c] for c in classes]), src.anchors(classes)).item()
    assert sims[20.0] < 0.5 * sims[0.0], sims  # squared cosine between the modes' offsets


def test_feature_diversity_term_lowers_feature_similarity(text_sampler):
    """A step down the gradient of the feature term alone makes the FP features of the K modes' images
    (same noise) less alike."""
    classes = [0, 1, 2]
    seeds = [item_seed(7, c, m) for c in classes for m in range(2)]
    src = source(text_sampler, w_ce=0.0, w_emb=0.0, w_feat=1.0)
    anchors = src.anchors(classes)
    embeds = src.initial_embeddings(classes, anchors).requires_grad_(True)
    total, parts = src.loss(embeds, anchors, classes, seeds)
    total.backward()
    assert total.item() == pytest.approx(parts["feat"]) and embeds.grad.abs().sum() > 0
    with torch.no_grad():
        _, after = src.loss(embeds - 2.0 * embeds.grad / embeds.grad.norm(), anchors, classes, seeds)
    assert after["feat"] < parts["feat"] - 0.005, (parts["feat"], after["feat"])


def test_embeddings_are_saved_and_reused(tiny_sampler, tmp_path):
    path = tmp_path / "emb.safetensors"
    src = source(tiny_sampler, steps=2, embeddings=str(path))
    src.prepare([0, 3])
    assert path.exists() and sorted(src.embeddings) == [0, 3]
    again = source(tiny_sampler, steps=2, embeddings=str(path))
    again.prepare([0, 3, 4])  # 0 and 3 come from the file; only 4 is learned
    assert again.stats["reused_classes"] == 2 and again.stats["learn_classes"] == 1
    assert torch.equal(again.embeddings[3], src.embeddings[3])
    assert sorted(again.load(path)) == [0, 3, 4]  # the file now holds all three
    x = again.generate_batch(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 2]))
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert not torch.allclose(x[0], x[1])  # modes 0 and 1 (and different noise)

    other = LearnedPromptSource(classifier(), PRE, ["x", "dog", "airplane", "egg", "ship"], sampler=tiny_sampler,
                                modes=2, embeddings=str(path))
    with pytest.raises(VitqcError, match="other class names"):
        other.prepare([0])
    with pytest.raises(VitqcError, match="2 modes per class but modes=3"):
        source(tiny_sampler, modes=3, embeddings=str(path)).prepare([0])


def test_interrupted_learning_resumes_from_the_saved_groups(tiny_sampler, tmp_path):
    path = tmp_path / "emb.safetensors"
    src = source(tiny_sampler, steps=2, classes_per_step=1, embeddings=str(path))
    calls, real_loss = [], src.loss

    def dying_loss(*args):
        calls.append(1)
        if len(calls) == 3:  # first step of the second class
            raise KeyboardInterrupt
        return real_loss(*args)

    src.loss = dying_loss
    with pytest.raises(KeyboardInterrupt):
        src.prepare([0, 1, 2])
    partial = tmp_path / "emb.rank0.partial.safetensors"
    assert partial.exists() and not path.exists()
    again = source(tiny_sampler, steps=2, classes_per_step=1, embeddings=str(path))
    again.prepare([0, 1, 2])
    assert again.stats["reused_classes"] == 1 and again.stats["learn_classes"] == 2
    assert sorted(again.load(path)) == [0, 1, 2] and not partial.exists()
