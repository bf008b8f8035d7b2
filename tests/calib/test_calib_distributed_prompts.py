"""Two ranks (spawn + gloo, CPU) learn the prompts of their own classes on the tiny diffusers pipeline;
rank 0 gathers them into one safetensors file."""
import json

import torch

from vitqc.calib.cache import read_manifest


def test_two_ranks_learn_their_classes_and_rank0_saves_all(tmp_path, tiny_sd_dir):
    from tests.calib.dist_worker import NAMES, learn_prompts
    from vitqc.calib.learned_prompts import LearnedPromptSource

    torch.multiprocessing.spawn(learn_prompts, args=(2, str(tmp_path / "init"), str(tmp_path), str(tiny_sd_dir)),
                                nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["learned"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [r["lp"]["learn_classes"] for r in ranks] == [3, 2]
    assert read_manifest(tmp_path / "lp")["status"] == "complete"
    assert len(list((tmp_path / "lp").glob("*/*.png"))) == 5
    reader = LearnedPromptSource(torch.nn.Identity(), None, NAMES, sampler=object(), modes=2)
    assert sorted(reader.load(tmp_path / "lp.safetensors")) == [0, 1, 2, 3, 4]
