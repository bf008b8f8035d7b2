"""Cyclic generation <-> quantization: images generated against the student, and joint_optimize's rounds."""
import copy

import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.calib import calibration_batches, make_source, plan_items
from vitqc.calib.cyclic import DatafreeRounds, mean_disagreement, round_items, round_starts
from vitqc.calib.features import normalise
from vitqc.calib.prompts import PromptSource
from vitqc.data import Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.15))
NAMES = [f"class_{i}" for i in range(5)]
ROUNDS = ["joint_optimize.iterations=6", "joint_optimize.batch_size=4", "joint_optimize.datafree_rounds=2",
          "joint_optimize.datafree_images=5"]


def _student(model: torch.nn.Module) -> torch.nn.Module:
    """A stand-in for a quantized student: the FP model with its weights rounded to a coarse grid."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() > 1:
                step = p.abs().max() / 3
                p.copy_(torch.round(p / step) * step)
    return student.requires_grad_(True)  # as joint_optimize's student: trainable, restored afterwards


def test_round_schedule_and_items_are_new():
    assert round_starts(300, 2) == [100, 200] and round_starts(10, 3) == [2, 5, 7]
    src = make_source("inversion", tiny_vit(), PRE, NAMES, seed=0, device="cpu", quiet=True)
    initial = set(plan_items(range(5), 2, seed=0, limit=10))
    seen = set(initial)
    for r in (1, 2):
        labels, indices = round_items(src, 10, 5, r)
        items = set(zip(labels.tolist(), indices.tolist()))
        assert len(items) == 5 and sorted(labels.tolist()) == [0, 1, 2, 3, 4] and not items & seen
        seen |= items


def test_inversion_generates_where_the_student_disagrees():
    model = tiny_vit()
    student = _student(model)
    flags = [p.requires_grad for p in student.parameters()]
    labels, indices = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0])
    # the disagreement term alone (the class and prior terms would dominate this random model's small KL)
    src = make_source("inversion", model, PRE, NAMES, seed=0, device="cpu", quiet=True, steps=8, w_disagree=1.0,
                      w_ce=0, w_patch=0, w_tv=0, w_l2=0)
    plain = normalise(src.generate_batch(labels, indices), PRE)
    history: list = []
    against = normalise(src.optimize(labels, indices, history=history, student=student), PRE)
    assert [p.requires_grad for p in student.parameters()] == flags  # frozen only while generating
    assert all(p.grad is None for p in student.parameters())
    assert history[-1]["disagree"] > 0
    assert mean_disagreement(src, student, against) > 1.5 * mean_disagreement(src, student, plain)
    torch.testing.assert_close(src.generate_disagreement(labels, indices, student), src.optimize(
        labels, indices, student=student))  # batched as the source batches


def test_prompts_generate_against_the_student(tiny_sampler):
    model = tiny_vit(num_classes=5, img_size=12)
    pre = Preprocess(input_size=(3, 12, 12), mean=(0.5,) * 3, std=(0.5,) * 3)
    student = _student(model)
    src = PromptSource(model, pre, ["cat", "dog", "egg", "ship", "tree"], sampler=tiny_sampler, seed=0, device="cpu",
                       quiet=True, refine_steps=6, refine_lr=0.2, refine_w_ce=0.0, refine_w_prior=0.0, w_disagree=1.0)
    labels, indices = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])
    plain = src.generate_batch(labels, indices)
    against = src.generate_disagreement(labels, indices, student)
    assert against.shape == plain.shape == (3, 3, 12, 12) and 0 <= against.min() and against.max() <= 1
    assert mean_disagreement(src, student, normalise(against, pre)) > mean_disagreement(src, student, normalise(plain, pre))
    assert src.parse_options({"refine_steps": "3"}).refine_steps == 3
    with pytest.raises(VitqcError, match="w_disagree must be >= 0"):
        src.parse_options({"w_disagree": -1})


def test_two_ranks_share_a_round_and_both_hold_all_of_it(tmp_path):
    """Under torchrun a round's classes are split (rank r: classes c % 2 == r) and every rank ends with the same
    pool: the images of both shares, in the round's order."""
    from tests.calib.dist_worker import datafree_round

    torch.multiprocessing.spawn(datafree_round, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.equal(ranks[0]["pool"], ranks[1]["pool"]) and ranks[0]["pool"].shape == (3 + 7, 3, 16, 16)
    src = make_source("inversion", tiny_vit(num_classes=5), Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3,
                      std=(0.5,) * 3), ["cat", "dog", "airplane", "egg", "ship"], seed=0, device="cpu", quiet=True)
    labels, _ = round_items(src, 3, 7, 1)
    shares = [sum(int(c) % 2 == r for c in labels) for r in (0, 1)]
    assert [r["record"][0]["generated_by_this_rank"] for r in ranks] == shares and min(shares) > 0
    assert ranks[0]["record"][0]["images"] == 7 and not torch.equal(ranks[0]["pool"][3:4], ranks[0]["pool"][4:5])


def test_noise_cannot_generate_against_the_student():
    src = make_source("noise", tiny_vit(), PRE, NAMES, seed=0, device="cpu", quiet=True)
    with pytest.raises(VitqcError, match="--calib noise cannot generate against the student"):
        DatafreeRounds(src, 2, 4, 10)


def _compile(source, batches, work_dir, resume=False, overrides=ROUNDS):
    import vitqc

    from vitqc.calib.spec import Calibration

    drawn = Calibration(torch.cat(batches), source=source)  # the source that made the images makes the rounds'
    return vitqc.compile(copy.deepcopy(source.model), "joint-w4a4", drawn, quiet=True,
                         work_dir=str(work_dir), resume=resume, set=overrides).quantized


def test_joint_optimize_rounds_grow_the_pool_and_resume_with_the_same_images(tmp_path, monkeypatch):
    model = tiny_vit()
    src = make_source("inversion", model, PRE, NAMES, seed=0, device="cpu", quiet=True, steps=3, batch_size=8)
    batches, _ = calibration_batches(src, model, PRE, NAMES, size=10, quiet=True)
    gm = _compile(src, batches, tmp_path / "a")
    rounds = gm.meta["vitqc"]["record"]["joint_optimize"]["datafree_rounds"]
    assert [(r["round"], r["step"], r["images"]) for r in rounds] == [(1, 2, 5), (2, 4, 5)]
    assert all(r["kl_new_images"] >= 0 and r["seconds"] >= 0 for r in rounds)
    first = torch.load(tmp_path / "a" / "datafree_round1.pt", weights_only=True)
    assert first.shape == (5, 3, 16, 16)

    # interrupted after round 1: a resumed run reads round 1 back (the student that made it is gone) and ends
    # where the uninterrupted run did
    import vitqc.passes.joint_optimize as jo

    calls = []
    original = DatafreeRounds._generate
    monkeypatch.setattr(DatafreeRounds, "_generate", lambda self, *a: calls.append(a[0]) or original(self, *a))
    monkeypatch.setattr(jo.JointOptimizeOptions, "checkpoint_every", 3)
    stop = _compile_until(src, batches, tmp_path / "b", steps=3)
    assert stop == 3 and calls == [1]
    calls.clear()
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "datafree_round1.pt").unlink()
    with pytest.raises(VitqcError, match="cannot resume: the images of data-free round 1"):
        _compile(src, batches, tmp_path / "c", resume=True, overrides=ROUNDS + ["joint_optimize.checkpoint_every=3"])
    resumed = _compile(src, batches, tmp_path / "b", resume=True,
                       overrides=ROUNDS + ["joint_optimize.checkpoint_every=3"])
    assert calls == [2]  # round 1 read back, round 2 generated
    record = resumed.meta["vitqc"]["record"]["joint_optimize"]["datafree_rounds"]
    assert record[0]["read_back"] and record[1]["images"] == 5
    for name in ("datafree_round1.pt", "datafree_round2.pt"):
        torch.testing.assert_close(torch.load(tmp_path / "b" / name, weights_only=True),
                                   torch.load(tmp_path / "a" / name, weights_only=True))
    expected = gm.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def _compile_until(source, batches, work_dir, steps):
    """Run a compile with rounds that is interrupted once joint_optimize has saved step ``steps``."""
    import vitqc.passes.joint_optimize as jo

    class Interrupted(Exception):
        pass

    save = jo._RunState.save

    def save_then_stop(self, *args):
        save(self, *args)
        if self.step >= steps:
            raise Interrupted

    jo._RunState.save = save_then_stop
    try:
        _compile(source, batches, work_dir, overrides=ROUNDS + ["joint_optimize.checkpoint_every=3"])
    except Interrupted:
        return steps
    finally:
        jo._RunState.save = save
    return -1


def test_real_images_run_without_rounds_and_say_so(capsys):
    import vitqc

    model = tiny_vit()
    gm = vitqc.compile(model, "joint-w4a4", torch.randn(8, 3, 16, 16), quiet=True, set=ROUNDS).quantized
    assert gm.meta["vitqc"]["record"]["joint_optimize"]["datafree_rounds"] == []
    err = capsys.readouterr().err
    assert "no data-free source" in err and "no rounds are generated" in err


def test_the_datafree_pipelines_run_rounds():
    from vitqc.pipeline import load_pipeline

    for name in ("joint-w4a4-datafree", "joint-w4a8-datafree"):
        options = {s.name: s.options for s in load_pipeline(name).steps}["joint_optimize"]
        assert options["datafree_rounds"] == 2 and options["datafree_images"] == 64


def test_learned_prompts_run_the_same_rounds(tiny_sampler, tmp_path):
    from vitqc.calib.learned_prompts import LearnedPromptSource

    model = tiny_vit(num_classes=3, img_size=12)
    pre = Preprocess(input_size=(3, 12, 12), mean=(0.5,) * 3, std=(0.5,) * 3)
    src = LearnedPromptSource(model, pre, ["cat", "dog", "egg"], sampler=tiny_sampler, seed=0, device="cpu",
                              quiet=True, steps=1, modes=2, refine_steps=2)
    batches, _ = calibration_batches(src, model, pre, src.class_names, size=6, quiet=True)
    gm = _compile(src, batches, tmp_path, overrides=ROUNDS[:3] + ["joint_optimize.datafree_images=3"])
    rounds = gm.meta["vitqc"]["record"]["joint_optimize"]["datafree_rounds"]
    assert [(r["round"], r["images"]) for r in rounds] == [(1, 3), (2, 3)]
    assert torch.load(tmp_path / "datafree_round2.pt", weights_only=True).shape == (3, 3, 12, 12)
