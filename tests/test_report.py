"""vitqc.report: the HTML page and its plots, made from an artifact alone; checked in a headless Chromium when
one is installed."""
import shutil
import subprocess

import pytest
import torch

import vitqc
from tests.conftest import TINY_PREPROCESS, tiny_vit
from vitqc.data import Preprocess


@pytest.fixture(scope="module")
def joint_artifact(tmp_path_factory):
    images = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("rep") / "joint.vitqc"
    vitqc.compile(tiny_vit(), "joint-w4a4", images, preprocess=Preprocess(**TINY_PREPROCESS), holdout=16,
                  set=["joint_optimize.iterations=12", "joint_optimize.batch_size=8"], out=path, quiet=True)
    return path


def test_report_writes_a_page_with_every_plot(joint_artifact, tmp_path):
    page = vitqc.report(joint_artifact, tmp_path / "r")
    text = page.read_text()
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert {"sqnr.png", "bits.png", "calibration.png", "ranges.png"} <= set(pngs)
    for name in pngs:
        assert f"src='{name}'" in text and (page.parent / name).stat().st_size > 1000
    assert "joint-w4a4" in text and "held out" in text


def test_report_page_renders_in_headless_chromium(joint_artifact, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian package chromium)")
    page = vitqc.report(joint_artifact, tmp_path / "r")
    shot = tmp_path / "shot.png"
    dump = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0 and "Per-layer SQNR" in dump.stdout and "<img" in dump.stdout
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", "--window-size=1100,1400",
                    page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert image.size == (1100, 1400) and len(colours) > 20  # plots drawn, not a blank page
