"""Data-parallel joint optimization: 2 gloo processes on the CPU (torch.multiprocessing.spawn) against one process
at the same global batch. The ranks' work is in tests/passes/joint_dist_worker.py."""
import time

import pytest
import torch
import torch.multiprocessing as mp

import vitqc
from tests.conftest import crash_after
from tests.passes.joint_dist_worker import BATCH, ITERATIONS, run, setup, trained_state
from vitqc import distributed as dist
from vitqc.passes import joint_optimize as jo

TIMEOUT_S = 240  # ~47 s of CPU in all (~30 s on 2 free cores); a hang fails the test instead of the suite


def spawn_ranks(tmp_path, world=2, meanwhile=lambda: None):
    """Run the worker's cases on ``world`` gloo ranks (``meanwhile()`` runs here as they do); what each saw."""
    context = mp.spawn(run, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        result = meanwhile()
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)], result


def assert_close_states(a, b, rtol=1e-4, atol=2e-5):  # Adam turns float-order noise in tiny gradients into ~1e-6
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dp")
    tiny_vit, calib, pipeline = setup()
    torch.set_num_threads(1)
    # a one-process checkpoint at step 3 for the ranks to resume (case 2 of the worker)
    with pytest.MonkeyPatch.context() as mpatch:
        crash_after(mpatch, jo._RunState, "save", lambda state: state.step == 3)
        with pytest.raises(KeyboardInterrupt):
            vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True, work_dir=str(tmp_path / "one"))

    def one_process():  # the references, while the ranks run
        return (vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True).quantized,
                vitqc.compile(tiny_vit(), pipeline(augment=False, cache_teacher=True), calib, quiet=True).quantized)

    ranks, (one, cached) = spawn_ranks(tmp_path, meanwhile=one_process)
    return {"one": one, "cached": cached, "ranks": ranks, "tmp": tmp_path, "setup": (tiny_vit, calib, pipeline)}


def test_two_ranks_take_the_steps_of_one_process_at_the_same_global_batch(two_ranks):
    r0, r1 = two_ranks["ranks"]
    one = two_ranks["one"]
    for name in r0["state"]:  # every rank holds the same model after every step
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert_close_states(r0["state"], trained_state(one))
    record, single = r0["record"], one.meta["vitqc"]["record"]["joint_optimize"]
    assert record["world_size"] == 2 and single["world_size"] == 1 and "data_parallel" not in single
    assert record["data_parallel"]["batch_per_rank"] == [3, 4] and record["batch_size"] == BATCH
    assert record["data_parallel"]["ranks_with_other_calibration"] == 1  # rank 1's images were overruled
    curve, single_curve = (torch.tensor(r["history"]["loss"]) for r in (record, single))
    assert record["history"]["step"] == single["history"]["step"] == list(range(1, ITERATIONS + 1))
    torch.testing.assert_close(curve, single_curve, rtol=1e-5, atol=0)  # the whole batch's loss, every step
    assert r1["record"]["history"] == record["history"]


def test_rank_0_alone_prints_and_writes_checkpoints(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert "joint_optimize: 1 of 2 ranks loaded other calibration images than rank 0; all train on rank 0's 48\n" \
        in r0["printed"] and "pass joint_optimize" in r0["printed"] and r1["printed"] == ""
    assert (two_ranks["tmp"] / "work0" / jo.CHECKPOINT_NAME).exists()
    assert not (two_ranks["tmp"] / "work1").exists()


def test_resume_with_another_number_of_processes(two_ranks):
    r0, r1 = two_ranks["ranks"]
    uninterrupted = trained_state(two_ranks["one"])
    # one process's checkpoint continued by two
    assert r0["resumed_from"] == r1["resumed_from"] == 3
    assert_close_states(r0["resumed_state"], uninterrupted)
    # two processes' checkpoint (interrupted after step 3) continued by one
    assert r0["interrupted"] and r1["interrupted"]
    tiny_vit, calib, pipeline = two_ranks["setup"]
    resumed = vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True, work_dir=str(two_ranks["tmp"] / "two"),
                            resume=True).quantized
    assert resumed.meta["vitqc"]["record"]["joint_optimize"]["resumed_from"] == 3
    assert_close_states(trained_state(resumed), uninterrupted)


def test_a_failing_rank_stops_the_others_with_one_line(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert r1["failure"] == "RuntimeError: simulated failure on rank 1"
    assert r0["failure"] == "VitqcError: joint_optimize stopped at step 2: 1 of 2 ranks failed (each prints its own error)"


def test_cached_teacher_under_two_ranks(two_ranks):
    r0, _ = two_ranks["ranks"]
    cached = two_ranks["cached"]
    assert r0["cached_record"]["teacher"] == "cached" and r0["cached_record"]["cache_teacher"]["used"]
    assert_close_states(r0["cached_state"], trained_state(cached))


def test_helpers_without_a_group():
    assert not dist.is_initialized() and dist.world_size() == 1 and dist.rank_prefix() == ""
    assert dist.broadcast_tree({"a": (1, torch.ones(2))})["a"][0] == 1
    t = torch.arange(3.0)
    dist.broadcast_([t])
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_gradient_reducer_buckets_and_binds_gradients():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 7)]
    reducer = dist.GradientReducer(params, bucket_bytes=8 * 4)  # 32 bytes: [3, 5] then [7]
    assert [b.numel() for b in reducer.buckets] == [8, 7] and reducer.nbytes == 60
    for _ in range(2):  # bound gradients are zeroed and accumulated into each step
        reducer.bind()
        (sum(p.sum() for p in params) * 2).backward()
        assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
        extra = reducer.all_reduce(torch.tensor([1.0]))  # one process: nothing to sum
        assert extra.item() == 1.0 and params[1].grad.data_ptr() == reducer.buckets[0][3:].data_ptr()


def test_batch_smaller_than_the_number_of_processes_is_refused(monkeypatch, calib):
    from tests.conftest import tiny_vit

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(dist, "init_from_env", lambda backend=None: False)
    with pytest.raises(vitqc.VitqcError, match="batch_size=2 is smaller than the 4 processes"):
        vitqc.compile(tiny_vit(), setup()[2](iterations=1, batch_size=2), calib, quiet=True)
