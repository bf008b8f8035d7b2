"""Class names: --class-names files, timm's ImageNet names, and the error for unnamed classes."""
import pytest

from tests.conftest import tiny_vit
from vitqc.calib.classes import folder_names, prompt_name, read_class_names, resolve_class_names
from vitqc.errors import VitqcError


def test_file_names(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("airplane\nautomobile\n bird \n\n")
    assert read_class_names(f) == ["airplane", "automobile", "bird"]
    assert resolve_class_names(tiny_vit(num_classes=3), 3, f) == ["airplane", "automobile", "bird"]
    with pytest.raises(VitqcError, match="has 3 names but the model has 5 classes"):
        resolve_class_names(tiny_vit(), 5, f)
    f.write_text("a\n\nb\n")
    with pytest.raises(VitqcError, match="empty line"):
        read_class_names(f)
    with pytest.raises(VitqcError, match="no such file"):
        read_class_names(tmp_path / "missing.txt")


def test_imagenet_names_come_from_timm():
    names = resolve_class_names(tiny_vit(num_classes=1000), 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and prompt_name(names[0]) == "tench"
    assert prompt_name(names[1]) == "goldfish"


def test_unnamed_classes():
    with pytest.raises(VitqcError, match="10 classes and no class names: pass --class-names FILE"):
        resolve_class_names(tiny_vit(num_classes=10), 10)
    assert resolve_class_names(tiny_vit(num_classes=10), 10, required=False)[3] == "class_0003"


def test_folder_names_sort_in_index_order():
    names = [f"n{i}" for i in range(1200)]
    folders = folder_names(names)
    assert sorted(folders) == folders and folders[7] == "0007_n7"
    assert folder_names(["great_white_shark, white shark", "???"]) == ["000_great_white_shark", "001"]
