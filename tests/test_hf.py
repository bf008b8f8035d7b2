"""transformers image models as vitqc inputs: hf:DIR, the logits adapter, preprocessing from the processor config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from vitqc.architectures import get
from vitqc.capture import capture, max_abs_diff
from vitqc.data import Preprocess
from vitqc.errors import VitqcError
from vitqc.hf import HFImageModel, preprocess_config
from vitqc.models import load_model


def _save(name: str, tmp_path: Path, processor=None) -> tuple[torch.nn.Module, Path]:
    model = get(name).model()
    model.save_pretrained(tmp_path)
    if processor is not None:
        processor.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("name,output", [
    ("hf_vit", "logits"), ("hf_vit_eager", "logits"), ("hf_deit", "logits"), ("hf_dinov2", "logits"),
    ("hf_dinov2_backbone", "pooler_output"), ("hf_swin", "logits"), ("hf_beit", "logits")])
def test_hf_dir_loads_offline_and_returns_one_tensor(name: str, output: str, tmp_path: Path) -> None:
    model, path = _save(name, tmp_path)
    loaded = load_model(f"hf:{path}", model_kwargs=get(name).load_kwargs)
    assert isinstance(loaded.module, HFImageModel) and not loaded.module.training
    assert loaded.source["attn_implementation"] == model.config._attn_implementation
    assert loaded.source["form"] == "hf" and loaded.source["output"] == output
    assert loaded.source["architecture"] == type(model).__name__
    x = get(name).example()
    with torch.no_grad():
        got = loaded.module(x)
        want = getattr(model(pixel_values=x), output)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    # module paths are transformers' own (no adapter prefix); the weights are shared, not copied
    assert dict(loaded.module.named_parameters()).keys() == dict(loaded.module.hf_model.named_parameters()).keys()


def test_deit_with_teacher_returns_the_mean_of_both_heads(tmp_path: Path) -> None:
    _, path = _save("hf_deit", tmp_path)
    module = load_model(f"hf:{path}").module
    x = get("hf_deit").example()
    with torch.no_grad():
        out = module.hf_model(pixel_values=x)
        assert torch.allclose(module(x), (out.cls_logits + out.distillation_logits) / 2)


def test_attn_implementation_and_output_are_model_kwargs(tmp_path: Path) -> None:
    _, path = _save("hf_dinov2_backbone", tmp_path)
    loaded = load_model(f"hf:{path}", model_kwargs={"attn_implementation": "eager", "output": "last_hidden_state"})
    assert loaded.source["attn_implementation"] == "eager" and loaded.source["output"] == "last_hidden_state"
    assert loaded.module(get("hf_dinov2_backbone").example()).dim() == 3


def test_a_transformers_model_is_captured_with_export(capsys) -> None:
    model = get("hf_vit").model()
    x = get("hf_vit").example()
    gm = capture(model, x)  # a raw PreTrainedModel: capture puts the adapter around it
    assert gm.meta["vitqc"]["frontend"] == "export" and gm.meta["vitqc"]["captured_from"] == "HFImageModel"
    assert capsys.readouterr().err.strip() == \
        "capture: HFImageModel with torch.export (transformers models branch on input shapes)"
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(pixel_values=x).logits) <= 1e-5


@pytest.mark.parametrize("processor,want", [
    (T.ViTImageProcessor(size={"height": 32, "width": 32}),
     {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear",
      "mean": (0.5, 0.5, 0.5)}),
    (T.DeiTImageProcessor(),  # resize to 256 x 256, centre crop 224, bicubic
     {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bicubic"}),
    (T.BitImageProcessor(size={"shortest_edge": 256}),  # DINOv2: shorter side to 256, centre crop 224
     {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
      "mean": (0.48145466, 0.4578275, 0.40821073)}),
])
def test_preprocessing_comes_from_the_processor_config(processor, want: dict, tmp_path: Path) -> None:
    _, path = _save("hf_vit", tmp_path, processor)
    cfg = load_model(f"hf:{path}").data_config
    assert {k: cfg[k] for k in want} == want
    pre = Preprocess.from_timm(cfg)
    assert pre.input_size == want["input_size"]
    from PIL import Image

    image = Image.new("RGB", (300, 260), (10, 200, 30))
    assert tuple(pre.transform()(image).shape) == want["input_size"]


def test_processor_configs_vitqc_cannot_follow_are_refused() -> None:
    base = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2}
    with pytest.raises(VitqcError, match="do_resize is false"):
        preprocess_config({**base, "do_resize": False})
    with pytest.raises(VitqcError, match="rescale_factor"):
        preprocess_config({**base, "rescale_factor": 1.0})
    with pytest.raises(VitqcError, match="varying shape"):
        preprocess_config({**base, "size": {"shortest_edge": 32}})
    with pytest.raises(VitqcError, match="resample"):
        preprocess_config({**base, "resample": "magic"})


def test_bad_hf_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(VitqcError, match="no config.json"):
        load_model(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(VitqcError, match="not a transformers image classifier"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(VitqcError, match="hf:DIR"):
        load_model("hf:")
