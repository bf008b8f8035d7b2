"""vitqc.data.preprocess: how an image becomes a model input."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.image_trees import IDENTITY4
from vitqc.data import Preprocess
from vitqc.data.preprocess import _timm_transform, _torchvision_transform
from vitqc.errors import VitqcError


def test_preprocess_solid_colour_exact():
    pre = Preprocess(input_size=(3, 4, 4), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    img = Image.new("RGB", (4, 4), (255, 0, 128))
    x = pre.transform()(img)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (128 / 255) / 2.0])
    assert torch.allclose(x, expected[:, None, None].expand(3, 4, 4), atol=1e-6)



def test_preprocess_resize_and_center_crop():
    # 6 wide x 4 high: shorter side is already 4, so only the center crop acts: columns 1..4 stay.
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    for col, value in enumerate([10, 20, 30, 40, 50, 60]):
        for row in range(4):
            img.putpixel((col, row), (value, value, value))
    x = IDENTITY4.transform()(img)
    assert torch.allclose(x[0, 0] * 255, torch.tensor([20.0, 30.0, 40.0, 50.0]), atol=1e-4)
    # A uniform 16x16 image resized (antialiased bicubic) to 4x4 stays uniform.
    x = IDENTITY4.transform()(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert torch.allclose(x, torch.tensor([200, 100, 50])[:, None, None] / 255.0 * torch.ones(3, 4, 4), atol=1e-6)



def test_preprocess_crop_pct():
    # crop_pct 0.5: resize the shorter side to 8, then keep the central 4x4 (the inner square).
    img = Image.new("L", (8, 8), 0)
    for r in range(2, 6):
        for c in range(2, 6):
            img.putpixel((c, r), 255)
    pre = Preprocess(input_size=(1, 4, 4), mean=(0.0,), std=(1.0,), crop_pct=0.5, interpolation="nearest")
    assert torch.equal(pre.transform()(img), torch.ones(1, 4, 4))



def test_preprocess_grayscale():
    pre = Preprocess(input_size=(1, 4, 4), mean=(0.5,), std=(0.5,))
    x = pre.transform()(Image.new("RGB", (4, 4), (100, 150, 200)))
    # PIL's ITU-R 601-2 luma: 100*.299 + 150*.587 + 200*.114 = 140.75 -> 141
    assert x.shape == (1, 4, 4)
    assert torch.allclose(x, torch.full((1, 4, 4), (141 / 255 - 0.5) / 0.5), atol=1e-6)
    # ... and a grey image fed to an RGB model is replicated over the channels
    x = IDENTITY4.transform()(Image.new("L", (4, 4), 51))
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.full((3, 4, 4), 0.2), atol=1e-6)



def test_transform_is_timm_eval_transform():
    pre = Preprocess(input_size=(3, 224, 224), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), crop_pct=0.875)
    text = repr(pre.transform())
    assert "ConvertMode('RGB')" in text and "Resize(size=256" in text and "bicubic" in text
    assert "CenterCrop(size=(224, 224))" in text



def test_torchvision_fallback_matches_timm():
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(30, 45, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    for crop_pct, mode in ((1.0, "center"), (0.875, "center"), (0.9, "squash")):
        pre = Preprocess(input_size=(3, 16, 16), mean=(0.4,) * 3, std=(0.2,) * 3, crop_pct=crop_pct, crop_mode=mode)
        assert torch.allclose(_timm_transform(pre)(img), _torchvision_transform(pre)(img), atol=1e-6)



def test_preprocess_dict_round_trip():
    pre = Preprocess(input_size=(1, 8, 8), mean=(0.3,), std=(0.4,), interpolation="bilinear", crop_pct=0.9)
    d = json.loads(json.dumps(pre.to_dict()))
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(VitqcError, match="lacks mean"):
        Preprocess.from_dict({"input_size": [3, 4, 4], "std": [1, 1, 1]})



def test_from_timm():
    import timm.data

    cfg = timm.data.resolve_data_config(
        pretrained_cfg={"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25,) * 3,
                        "crop_pct": 0.9, "interpolation": "bilinear"}
    )
    pre = Preprocess.from_timm(cfg)
    assert pre == Preprocess((3, 32, 32), (0.5,) * 3, (0.25,) * 3, "bilinear", 0.9, "center")
    assert Preprocess.from_timm({"input_size": (1, 8, 8), "mean": (0.2,), "std": (0.3,)}).crop_pct == 0.875
    with pytest.raises(VitqcError, match="3 values but the input has 1 channel"):
        Preprocess.from_timm({"input_size": (1, 8, 8), "mean": (0.2, 0.2, 0.2), "std": (0.3,)})



def test_from_flags():
    pre = Preprocess.from_flags(32, 0, 1, "bicubic", 1.0)
    assert pre == Preprocess((3, 32, 32), (0.0,) * 3, (1.0,) * 3)
    pre = Preprocess.from_flags((24, 16), "0.1,0.2,0.3", [0.5, 0.5, 0.5], None, None)
    assert pre.input_size == (3, 24, 16) and pre.mean == (0.1, 0.2, 0.3) and pre.crop_pct == 1.0
    assert Preprocess.from_flags(224, "imagenet", "imagenet", None, 0.875).std == (0.229, 0.224, 0.225)
    assert Preprocess.from_flags(8, 0.3, 0.4, "bilinear", None, channels=1).input_size == (1, 8, 8)
    with pytest.raises(VitqcError, match="--mean is required for 1-channel"):
        Preprocess.from_flags(8, None, None, None, None, channels=1)
    with pytest.raises(VitqcError, match="not a list of numbers"):
        Preprocess.from_flags(8, "a,b", 1, None, None)
    with pytest.raises(VitqcError, match="2 values but the input has 3"):
        Preprocess.from_flags(8, (0.1, 0.2), 1, None, None)
    with pytest.raises(VitqcError, match="interpolation 'cubic' is unknown"):
        Preprocess.from_flags(8, 0, 1, "cubic", None)
    with pytest.raises(VitqcError, match="crop_pct"):
        Preprocess.from_flags(8, 0, 1, None, 1.5)
    with pytest.raises(VitqcError, match="every std must be positive"):
        Preprocess.from_flags(8, 0, 0, None, None)

