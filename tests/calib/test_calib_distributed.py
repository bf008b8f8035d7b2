"""Two ranks (torch.multiprocessing.spawn + gloo on the CPU) split the classes of generation: rank r makes
the classes c with c % 2 == r, rank 0 writes the manifest."""
import json

import torch

from vitqc.calib import distributed as dist
from vitqc.calib.cache import read_manifest


def test_helpers_without_a_group():
    assert not dist.is_initialized() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.shard_classes(range(7), 1, 3) == [1, 4]
    assert dist.shard_classes(range(3)) == [0, 1, 2]
    assert dist.gather_dict({1: "a"}) == {1: "a"} and dist.all_sum(3) == 3
    assert dist.init_from_env() is False  # no WORLD_SIZE: stays single-process


def test_two_ranks_split_the_classes(tmp_path):
    from tests.calib.dist_worker import generate

    torch.multiprocessing.spawn(generate, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["inv"]["shards_written"] for r in ranks] == [6, 4]  # classes {0, 2, 4} and {1, 3}, 2 shards each
    assert [r["noise"]["generated"] for r in ranks] == [9, 6]
    for name, shards, images in (("inv", 10, 10), ("noise", 10, 15)):
        m = read_manifest(tmp_path / name)
        assert m["status"] == "complete" and m["progress"] == {"shards": shards, "done": shards}
        assert sorted(s["rank"] for s in m["stats"]) == [0, 1]
        assert len(list((tmp_path / name).glob("*/*.png"))) == images
    assert sorted(p.name for p in (tmp_path / "inv" / "003_egg").iterdir()) == ["000000.png", "000001.png"]
