import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQC_SHARED", REPO.parent / "shared"))

# under pytest-xdist each worker gets one thread, so two workers share the two cores without thrashing
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def tiny_vit(num_classes: int = 5, **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
               num_classes=num_classes)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


TINY_PREPROCESS = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """(path, quantized graph) of tiny_vit compiled with minmax-w4a8 on random images, saved as an artifact."""
    import vitqc
    from vitqc.data import Preprocess

    images = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("tiny_artifact") / "tiny.vitqc"
    result = vitqc.compile(tiny_vit(), "minmax-w4a8", images, preprocess=Preprocess(**TINY_PREPROCESS), holdout=16,
                           out=path, quiet=True)
    return path, result.quantized


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return list(torch.randn(64, 3, 16, 16, generator=g).split(16))


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "assets").is_dir():
        pytest.skip("../shared assets are not present")
    return SHARED


def crash_after(monkeypatch, cls, method: str, condition) -> None:
    """Simulate a kill: ``cls.method`` runs, then raises KeyboardInterrupt when ``condition(self)`` holds.
    ``monkeypatch.undo()`` gives the method back."""
    real = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if condition(self):
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(cls, method, wrapped)


def run_cli(args, capsys):
    """``vitqc ARGS`` in this process: (exit code, stdout, stderr)."""
    from vitqc.cli.main import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def int_layer_io(gm, x):
    """{path: (input, output)} of every integer layer of ``gm`` when it runs on ``x``."""
    from vitqc.quant.modules import INT_LAYERS

    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
             for name, m in gm.named_modules() if isinstance(m, INT_LAYERS)]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def assert_close_but_for_code_flips(after, before, rtol=1e-5, flipped=0.1, flip_size=5e-2, argmax=1.0):
    """``after`` equals ``before`` up to float rounding on all but a ``flipped`` share of images: there the
    rounding moved an activation across a code boundary, a change of at most ``flip_size`` of the largest
    logit; and at least ``argmax`` of the predictions agree."""
    per_image = (after - before).abs().amax(-1) / before.abs().amax()
    assert float((per_image <= rtol).float().mean()) >= 1 - flipped, per_image
    assert float(per_image.max()) <= flip_size, per_image
    assert float((after.argmax(-1) == before.argmax(-1)).float().mean()) >= argmax
