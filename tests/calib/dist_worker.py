"""Ranks of the 2-process gloo tests (tests/calib/test_calib_distributed*.py); importable by spawn."""
import json
import os
from pathlib import Path

import torch
import torch.distributed as td

NAMES = ["cat", "dog", "airplane", "egg", "ship"]


def _start(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _model_and_preprocess():
    from tests.conftest import tiny_vit
    from vitqc.data import Preprocess

    return tiny_vit(num_classes=5), Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def generate(rank: int, world: int, init_file: str, out: str) -> None:
    """Inversion and noise caches, classes split across ranks."""
    _start(rank, world, init_file)
    try:
        from vitqc.calib.cache import write_cache
        from vitqc.calib.inversion import InversionSource
        from vitqc.calib.noise import NoiseSource

        out_dir = Path(out)
        model, pre = _model_and_preprocess()
        inv = InversionSource(model, pre, NAMES, seed=0, device="cpu", quiet=True, steps=2, batch_size=4)
        inv_stats = write_cache(inv, out_dir / "inv", per_class=2, shard_size=1, quiet=True)
        noise_stats = write_cache(NoiseSource(model, pre, NAMES, seed=0, device="cpu", quiet=True),
                                  out_dir / "noise", per_class=3, shard_size=2, quiet=True)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"inv": inv_stats, "noise": noise_stats}))
    finally:
        td.destroy_process_group()


def learn_prompts(rank: int, world: int, init_file: str, out: str, sd_dir: str) -> None:
    """Prompt learning split across ranks; rank 0 writes one embeddings file."""
    _start(rank, world, init_file)
    try:
        from vitqc.calib.cache import write_cache
        from vitqc.calib.diffusion import load_diffusion
        from vitqc.calib.learned_prompts import LearnedPromptSource

        out_dir = Path(out)
        model, pre = _model_and_preprocess()
        lp = LearnedPromptSource(model, pre, NAMES, sampler=load_diffusion(sd_dir, device="cpu"), seed=0,
                                 device="cpu", quiet=True, modes=2, steps=1, classes_per_step=5,
                                 embeddings=str(out_dir / "lp.safetensors"))
        stats = write_cache(lp, out_dir / "lp", per_class=1, quiet=True)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"lp": stats, "learned": sorted(lp.embeddings)}))
    finally:
        td.destroy_process_group()


def datafree_round(rank: int, world: int, init_file: str, out: str) -> None:
    """One data-free round of joint_optimize (inversion against a coarse student), its classes split across ranks;
    each rank saves the pool it ends with and the round's record."""
    _start(rank, world, init_file)
    try:
        import copy

        from vitqc.calib.cyclic import DatafreeRounds
        from vitqc.calib.inversion import InversionSource

        model, pre = _model_and_preprocess()
        student = copy.deepcopy(model)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        src = InversionSource(model, pre, NAMES, seed=0, device="cpu", quiet=True, steps=2, batch_size=4)
        rounds = DatafreeRounds(src, rounds=1, per_round=7, iterations=4, quiet=True)
        pool = torch.zeros(3, *pre.input_size)
        grown = rounds.images_at(rounds.starts[0], student, pool)
        torch.save({"pool": grown, "record": rounds.record}, Path(out) / f"rank{rank}.pt")
    finally:
        td.destroy_process_group()
