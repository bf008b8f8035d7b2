"""Ranks of the 2-process gloo test of data-parallel joint optimization (test_joint_optimize_distributed.py);
importable by torch.multiprocessing.spawn. Each rank runs every case in turn and writes what it saw to
OUT/rank{r}.pt; the test compares the ranks with each other and with one process."""
import contextlib
import datetime
import io
import os
from pathlib import Path

import torch
import torch.distributed as td

ITERATIONS = 6
BATCH = 7  # uneven: rank 0 takes 3 images of every batch, rank 1 takes 4


def setup():
    """What both the ranks and the one-process reference use: the model, the calibration images, the pipeline."""
    from tests.conftest import tiny_vit
    from vitqc.pipeline import Pipeline

    def pipeline(iterations=ITERATIONS, **options):
        return Pipeline.from_list([
            "canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 4}), "channel_rescale",
            "weight_refine", ("calibrate", {"max_images": 32}),
            ("joint_optimize", {"iterations": iterations, "batch_size": BATCH, "checkpoint_every": 3, **options})])

    calib = list(torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))
    return tiny_vit, calib, pipeline


def trained_state(gm):
    return {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}


def run(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                          timeout=datetime.timedelta(seconds=60))
    try:
        import vitqc
        from vitqc.passes import joint_optimize as jo

        tiny_vit, calib, pipeline = setup()
        out_dir = Path(out)
        seen: dict = {}

        # 1. a whole run, augmented, printing as a user would see it; each rank is given its own work dir, and
        # rank 1 other calibration images (so also other quantizer ranges before joint_optimize): rank 0's count
        stderr = io.StringIO()
        mine = calib if rank == 0 else [x.flip(0) + 0.5 for x in calib]
        with contextlib.redirect_stderr(stderr):
            gm = vitqc.compile(tiny_vit(), pipeline(), mine, work_dir=str(out_dir / f"work{rank}")).quantized
        seen["state"] = trained_state(gm)
        seen["record"] = gm.meta["vitqc"]["record"]["joint_optimize"]
        seen["printed"] = stderr.getvalue()

        # 2. resume a checkpoint that one process wrote at step 3 (the test wrote it before spawning)
        gm = vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True, work_dir=str(out_dir / "one"), resume=True).quantized
        seen["resumed_state"] = trained_state(gm)
        seen["resumed_from"] = gm.meta["vitqc"]["record"]["joint_optimize"]["resumed_from"]

        # 3. interrupted after the step-3 checkpoint, on every rank alike; the test resumes it in one process
        real_step = jo._Training.step

        def interrupted(self, pool, cache):
            if self.state.step == 4:
                raise KeyboardInterrupt
            return real_step(self, pool, cache)

        jo._Training.step = interrupted
        try:
            vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True, work_dir=str(out_dir / "two"))
        except KeyboardInterrupt:
            seen["interrupted"] = True
        jo._Training.step = real_step

        # 4. rank 1 fails inside a step: it raises its own error, rank 0 stops with one line instead of waiting
        real_images = jo.batch_images
        calls = {"n": 0}

        def failing(*args):
            calls["n"] += 1
            if rank == 1 and calls["n"] == 3:
                raise RuntimeError("simulated failure on rank 1")
            return real_images(*args)

        jo.batch_images = failing
        try:
            vitqc.compile(tiny_vit(), pipeline(), calib, quiet=True)
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            seen["failure"] = f"{type(exc).__name__}: {exc}"
        jo.batch_images = real_images

        # 5. the teacher's outputs cached (no augmentation)
        gm = vitqc.compile(tiny_vit(), pipeline(augment=False, cache_teacher=True), calib, quiet=True).quantized
        seen["cached_state"] = trained_state(gm)
        seen["cached_record"] = gm.meta["vitqc"]["record"]["joint_optimize"]
        torch.save(seen, out_dir / f"rank{rank}.pt")
    finally:
        td.destroy_process_group()
