import pytest
import torch

import vitqc
from tests.conftest import crash_after, tiny_vit
from vitqc.demo import demo_calibration, demo_eval_batches, load_demo_model
from vitqc.errors import VitqcError
from vitqc.passes import joint_optimize as jo
from vitqc.pipeline import Pipeline


def joint_pipeline(iterations, **options):
    return Pipeline.from_list([
        "canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 4}), "channel_rescale", "weight_refine",
        ("calibrate", {"max_images": 32}), ("joint_optimize", {"iterations": iterations, "batch_size": 16, **options}),
    ])


def agreement(model, reference, batches):
    agree = total = 0
    with torch.no_grad():
        for x, _ in batches:
            agree += int((model(x).argmax(-1) == reference(x).argmax(-1)).sum())
            total += len(x)
    return agree / total


def test_joint_w4a4_beats_minmax_w4a4_agreement_with_fp():
    calib = demo_calibration(size=256, seed=0)[0]
    fp = load_demo_model()
    test = list(demo_eval_batches())
    minmax = vitqc.compile(load_demo_model(), "minmax-w4a4", calib, quiet=True).quantized
    joint = vitqc.compile(load_demo_model(), joint_pipeline(150, lr_quant=1e-2), calib, quiet=True).quantized
    record = joint.meta["vitqc"]["record"]["joint_optimize"]
    assert record["final"]["loss"] < record["first_loss"]
    assert record["feature_scopes"] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    a_minmax, a_joint = agreement(minmax, fp, test), agreement(joint, fp, test)
    assert a_joint > a_minmax, (a_joint, a_minmax)


def trained_state(gm):
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


def test_resume_continues_to_the_same_result(tmp_path, calib, monkeypatch):
    pipe = joint_pipeline(12, checkpoint_every=4)
    uninterrupted = trained_state(vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized)

    crash_after(monkeypatch, jo._RunState, "save", lambda state: state.step == 8)  # after the second checkpoint
    with pytest.raises(KeyboardInterrupt):
        vitqc.compile(tiny_vit(), pipe, calib, quiet=True, work_dir=str(tmp_path)).quantized
    monkeypatch.undo()
    resumed = vitqc.compile(tiny_vit(), pipe, calib, quiet=True, work_dir=str(tmp_path), resume=True).quantized
    assert resumed.meta["vitqc"]["record"]["joint_optimize"]["resumed_from"] == 8
    state = trained_state(resumed)
    assert state.keys() == uninterrupted.keys()
    for name in state:
        assert torch.equal(state[name], uninterrupted[name]), name


def test_resume_refuses_a_checkpoint_made_with_other_options(tmp_path, calib):
    vitqc.compile(tiny_vit(), joint_pipeline(4, checkpoint_every=2), calib, quiet=True, work_dir=str(tmp_path)).quantized
    with pytest.raises(vitqc.VitqcError, match="other joint_optimize options"):
        vitqc.compile(tiny_vit(), joint_pipeline(4, batch_size=8), calib, quiet=True, work_dir=str(tmp_path),
                      resume=True).quantized


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, calib, monkeypatch):
    real_augment = jo.apply_augment
    calls = {"n": 0}

    def poisoned(x, *drawn):
        calls["n"] += 1
        out = real_augment(x, *drawn)
        return out * float("nan") if calls["n"] > 5 else out

    monkeypatch.setattr(jo, "apply_augment", poisoned)
    with pytest.raises(vitqc.VitqcError, match=r"loss became nan at step 5; the last good checkpoint is kept"):
        vitqc.compile(tiny_vit(), joint_pipeline(10, checkpoint_every=4), calib, quiet=True, work_dir=str(tmp_path)).quantized
    saved = torch.load(tmp_path / jo.CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["params"].values())


def test_blockwise_mode_trains_each_block_in_turn(calib):
    gm = vitqc.compile(tiny_vit(), joint_pipeline(6, mode="blockwise"), calib, quiet=True).quantized
    record = gm.meta["vitqc"]["record"]["joint_optimize"]
    assert record["mode"] == "blockwise" and record["feature_scopes"] == ["blocks.0", "blocks.1"]
    stages = jo.JointOptimize({"mode": "blockwise"})._stages(
        jo.trainable_groups(gm, jo.JointOptimizeOptions()), record["feature_scopes"])
    assert [scope for _, scope in stages] == ["blocks.0", "blocks.1", None]  # then patch embed + head on logits


def test_iterations_and_batch_size_are_overridable():
    pipe = vitqc.load_pipeline("joint-w4a4").with_overrides(["joint_optimize.iterations=500",
                                                             "joint_optimize.batch_size=8"])
    step = next(s for s in pipe.instantiate() if s.name == "joint_optimize")
    assert (step.options.iterations, step.options.batch_size) == (500, 8)


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(calib):
    from vitqc.scopes import block_scopes, with_scope_outputs

    gm = vitqc.compile(tiny_vit(), Pipeline.from_list(joint_pipeline(1).steps[:-1]), calib, quiet=True).quantized
    blocks = block_scopes(gm, jo.JointOptimizeOptions().features)
    plain = with_scope_outputs(gm, blocks)
    checkpointed = jo.checkpointed_blocks(plain, blocks)
    wrapped = [n for n, m in checkpointed.named_children() if isinstance(m, jo._Checkpointed)]
    assert len(wrapped) == len(blocks) == 2
    x = calib[0]
    grads = []
    for model in (plain, checkpointed):
        gm.zero_grad(set_to_none=True)
        out, *feats = model(x)
        (out.square().mean() + sum(f.square().mean() for f in feats)).backward()
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_option_trains_to_the_same_result(calib):
    a = trained_state(vitqc.compile(tiny_vit(), joint_pipeline(3), calib, quiet=True).quantized)
    b = trained_state(vitqc.compile(tiny_vit(), joint_pipeline(3, activation_checkpointing=True), calib, quiet=True).quantized)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_compile_option_trains_to_the_same_result(calib):
    """joint_optimize.compile (torch.compile of teacher and student) changes how the step runs, not what it
    computes (up to float reassociation in the fused kernels); the first steps are timed apart."""
    eager = vitqc.compile(tiny_vit(), joint_pipeline(4), calib, quiet=True).quantized
    compiled = vitqc.compile(tiny_vit(), joint_pipeline(4, compile=True), calib, quiet=True).quantized
    a, b = trained_state(eager), trained_state(compiled)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    record = compiled.meta["vitqc"]["record"]["joint_optimize"]
    assert record["warmup_steps"] == jo.WARMUP_STEPS and 0 < record["warmup_seconds"] <= record["seconds"]


def test_compile_mode_reaches_torch_compile_and_needs_compile(calib, monkeypatch):
    """joint_optimize.compile_mode is torch.compile's mode for teacher and student (the compile itself is
    replaced here: test_compile_option_trains_to_the_same_result runs a real one)."""
    modes = []

    def fake_compile(module, **kwargs):
        modes.append(kwargs["mode"])
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    vitqc.compile(tiny_vit(), joint_pipeline(1, compile=True, compile_mode="reduce-overhead"), calib, quiet=True).quantized
    assert modes == ["reduce-overhead", "reduce-overhead"]
    with pytest.raises(VitqcError, match="compile_mode='reduce-overhead' needs joint_optimize.compile=true"):
        vitqc.compile(tiny_vit(), joint_pipeline(1, compile_mode="reduce-overhead"), calib, quiet=True).quantized


def test_amp_cpu_runs_the_step_under_bf16_autocast_where_the_cpu_has_bf16(calib, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    seen = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    gm = vitqc.compile(tiny_vit(), joint_pipeline(2, amp_cpu=True), calib, quiet=True).quantized
    record = gm.meta["vitqc"]["record"]["joint_optimize"]
    assert record["autocast"] == "bf16" and torch.bfloat16 in seen
    assert all(torch.isfinite(torch.tensor(v)) for v in record["final"].values())
    assert vitqc.compile(tiny_vit(), joint_pipeline(1), calib, quiet=True).quantized.meta["vitqc"]["record"]["joint_optimize"]["autocast"] is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(VitqcError, match="no native bf16 .*leave amp_cpu off"):
        vitqc.compile(tiny_vit(), joint_pipeline(1, amp_cpu=True), calib, quiet=True).quantized


def test_cache_teacher_looks_up_what_the_teacher_would_compute(calib, capsys):
    plain = vitqc.compile(tiny_vit(), joint_pipeline(3, augment=False), calib, quiet=True).quantized
    cached = vitqc.compile(tiny_vit(), joint_pipeline(3, augment=False, cache_teacher=True), calib, quiet=True).quantized
    a, b = trained_state(plain), trained_state(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    record, before = (g.meta["vitqc"]["record"]["joint_optimize"] for g in (cached, plain))
    assert before["teacher"] == "inference_mode" and before["cache_teacher"] is None
    info = record["cache_teacher"]
    # 64 images x (5 logits + 2 blocks x 17 tokens x 32 channels) float32
    assert record["teacher"] == "cached" and info["used"] and info["images"] == 64
    assert info["mb"] == round(64 * (5 + 2 * 17 * 32) * 4 / 2**20, 1)
    # over its budget it is skipped, said and recorded
    over = vitqc.compile(tiny_vit(), joint_pipeline(1, augment=False, cache_teacher=True, cache_teacher_mb=0.1), calib).quantized
    record = over.meta["vitqc"]["record"]["joint_optimize"]
    assert record["teacher"] == "inference_mode" and record["cache_teacher"]["used"] is False
    assert ("joint_optimize: the teacher's outputs for 64 images need 0.3 MB, over cache_teacher_mb=0.1; the teacher "
            "runs every step instead\n") in capsys.readouterr().err
    with pytest.raises(VitqcError, match="cache_teacher needs a fixed calibration set: set joint_optimize.augment=false"):
        vitqc.compile(tiny_vit(), joint_pipeline(1, cache_teacher=True), calib, quiet=True).quantized
