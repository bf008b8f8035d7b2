"""vitqc.passes.manager: runs passes in order, counts what each changed, dumps graphs, records history."""
import torch

from tests.conftest import tiny_vit
from vitqc.capture import capture
from vitqc.passes.base import APPLIED, CompileContext, applied, get_pass
from vitqc.passes.manager import PassManager


def test_passes_run_in_order_with_statistics_dumps_and_history(tmp_path, capsys):
    x = torch.randn(8, 3, 16, 16)
    gm = capture(tiny_vit(), x[:1])
    passes = [get_pass(n)() for n in ("canonicalize", "insert_quantizers", "calibrate")]
    manager = PassManager(passes, dump_dir=tmp_path)
    out = manager(gm, CompileContext(calib=x)).graph_module
    assert [s.name for s in manager.stats] == ["canonicalize", "insert_quantizers", "calibrate"]
    inserted = manager.stats[1]
    assert inserted.modified and inserted.added > 0 and inserted.seconds >= 0
    assert "insert_quantizers" in capsys.readouterr().err  # one line per pass on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_captured.txt", "01_canonicalize.txt",
                                                          "02_insert_quantizers.txt", "03_calibrate.txt"]
    assert out.meta[APPLIED][-3:] == ["canonicalize", "insert_quantizers", "calibrate"]  # (canonicalize runs others)
    assert applied(out, "calibrate") and not applied(out, "joint_optimize")
