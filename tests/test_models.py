"""load_model: every input form, and a one-line VitqcError for each bad input."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from vitqc.capture import capture, max_abs_diff
from vitqc.errors import TraceFailure, VitqcError
from vitqc.models import LoadedModel, example_input, load_model, sha256_file

VIT = "vit_tiny_patch16_224"
KW = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(VIT, pretrained=False, **KW).eval()


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(VitqcError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ forms
def test_timm_name_with_kwargs() -> None:
    loaded = load_model(f"timm:{VIT}", KW)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.module.training
    assert loaded.source["form"] == "timm" and loaded.source["name"] == VIT
    assert loaded.source["kwargs"] == KW
    json.dumps(loaded.source)
    assert loaded.data_config is not None
    assert loaded.data_config["input_size"] == (3, 32, 32)  # the model's size, not the pretrained cfg's 224
    x = example_input(loaded, batch_size=2)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x, example_input(loaded, batch_size=2))  # seeded
    assert loaded.module(x).shape == (2, 1000)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped", "pth_ddp"])
def test_timm_checkpoint(tmp_path: Path, fmt: str) -> None:
    ref = _vit(seed=7)
    state = ref.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {"state_dict": state, "epoch": 3} if fmt == "pth_wrapped" else state
        if fmt == "pth_ddp":
            obj = {f"module.{k}": v for k, v in state.items()}
        torch.save(obj, path)
    loaded = load_model(f"timm:{VIT}", KW, checkpoint=str(path))
    assert _same_params(loaded.module, ref)
    assert loaded.source["checkpoint"] == {"path": str(path.resolve()), "sha256": sha256_file(path)}
    json.dumps(loaded.source)


def test_checkpoint_mismatch_is_one_line(tmp_path: Path) -> None:
    state = _vit().state_dict()
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    msg = _error(load_model, f"timm:{VIT}", KW, checkpoint=str(path))
    assert "missing keys: head.weight" in msg and "unexpected keys: extra.weight" in msg
    other = timm.create_model(VIT, pretrained=False, **{**KW, "embed_dim": 64}).state_dict()
    torch.save(other, path)
    assert "size mismatch" in _error(load_model, f"timm:{VIT}", KW, checkpoint=str(path))
    assert "does not exist" in _error(load_model, f"timm:{VIT}", KW, checkpoint=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert "safetensors" in _error(load_model, f"timm:{VIT}", KW, checkpoint=str(tmp_path / "junk.safetensors"))


def test_pickled_module(tmp_path: Path) -> None:
    ref = _vit(seed=3)
    path = tmp_path / "model.pt"
    torch.save(ref, path)
    loaded = load_model(str(path))
    assert loaded.source["form"] == "pickle" and loaded.source["sha256"] == sha256_file(path)
    assert _same_params(loaded.module, ref)
    assert loaded.data_config["input_size"] == (3, 32, 32)


def test_exported_program(tmp_path: Path) -> None:
    ref = _vit(seed=4)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(ref, (x,), dynamic_shapes=({0: batch},)), str(path))
    loaded = load_model(str(path))
    assert loaded.source["form"] == "export"
    with torch.no_grad():
        assert max_abs_diff(loaded.module(x), ref(x)) <= 1e-5
    gm = capture(loaded.module, x)  # captured from its own graph: the export front end
    assert gm.meta["vitqc"]["frontend"] == "export"
    with torch.no_grad():
        assert max_abs_diff(gm(x[:1]), ref(x[:1])) <= 1e-5  # any batch size runs


def test_exported_program_with_a_fixed_batch_is_refused(tmp_path: Path) -> None:
    ref = _vit(seed=4)
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(ref, (x,)), str(path))
    loaded = load_model(str(path))
    with pytest.raises(TraceFailure, match="fixed batch size of 1.*Dim"):
        capture(loaded.module, x)


def test_factory_file(tmp_path: Path) -> None:
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, dim):
                super().__init__()
                self.fc = nn.Linear(dim, 2)
            def forward(self, x):
                return self.fc(x)

        def build(dim=4):
            return Tiny(dim)

        NOT_CALLABLE = 3

        def not_a_module():
            return "hello"

        def broken(**kw):
            raise ValueError("bad config")
    """))
    loaded = load_model(f"{path}:build", {"dim": 6})
    assert loaded.source["form"] == "factory" and loaded.source["factory"] == "build"
    assert loaded.module.fc.in_features == 6 and not loaded.module.training
    assert loaded.data_config is None
    assert "--img-size" in _error(example_input, loaded)
    # with a checkpoint
    ckpt = tmp_path / "tiny.safetensors"
    save_file(loaded.module.state_dict(), str(ckpt))
    again = load_model(f"{path}:build", {"dim": 6}, checkpoint=str(ckpt))
    assert _same_params(again.module, loaded.module)
    # bad factories
    assert "has no 'missing'" in _error(load_model, f"{path}:missing")
    assert "build" in _error(load_model, f"{path}:missing")  # lists what the file defines
    assert "not a callable" in _error(load_model, f"{path}:NOT_CALLABLE")
    assert "not an nn.Module" in _error(load_model, f"{path}:not_a_module")
    assert "bad config" in _error(load_model, f"{path}:broken")
    assert "does not exist" in _error(load_model, f"{tmp_path / 'none.py'}:build")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    assert "importing" in _error(load_model, f"{tmp_path / 'syntax.py'}:f")


# ------------------------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path: Path) -> None:
    for name in ("m.pt", "m.pth", "m.pt2"):
        assert "does not exist" in _error(load_model, str(tmp_path / name))


def test_corrupt_files(tmp_path: Path) -> None:
    for name in ("m.pt", "m.pt2"):
        (tmp_path / name).write_bytes(b"\x00garbage\xff" * 10)
        assert "could not read" in _error(load_model, str(tmp_path / name))


def test_not_a_module(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    assert "holds a list, not an nn.Module" in _error(load_model, str(path))


def test_state_dict_in_pt(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_vit().state_dict(), path)
    msg = _error(load_model, str(path))
    assert "holds a state dict, not a module" in msg and "timm:NAME --checkpoint" in msg
    torch.save({"model": _vit().state_dict(), "epoch": 1}, path)
    assert "holds a state dict" in _error(load_model, str(path))


def test_whole_model_as_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_vit(), path)
    assert "more than tensors" in _error(load_model, f"timm:{VIT}", KW, checkpoint=str(path))


def test_unknown_timm_name() -> None:
    msg = _error(load_model, "timm:vit_tiny_patch16_22")
    assert "unknown timm model" in msg and "timm.list_models" in msg and "vit_tiny_patch16_224" in msg
    assert "did you mean timm:vit_tiny_patch16_224" in _error(load_model, "vit_tiny_patch16_224")
    assert "does not accept" in _error(load_model, f"timm:{VIT}", {"no_such_kwarg": 1})


def test_pretrained_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache; check your connection")

    monkeypatch.setattr(timm, "create_model", offline)
    msg = _error(load_model, f"timm:{VIT}", KW, pretrained=True)
    assert "could not download" in msg and "--checkpoint FILE" in msg
