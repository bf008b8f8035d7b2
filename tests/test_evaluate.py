"""vitqc.evaluate: comparison of a quantized program with its FP one, top-1, and evaluate() on any target."""
import pytest
import torch

from tests.conftest import tiny_vit
from tests.image_trees import random_image_folder
from vitqc.evaluate import compare, evaluate, top1


class Broken(torch.nn.Module):
    def forward(self, x):
        out = torch.zeros(len(x), 5)
        out[0] = float("nan")
        return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    random_image_folder(root, classes=2, per_class=6)
    return root


def test_compare_counts_agreement_top1_and_non_finite_logits(capsys):
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    model = tiny_vit()
    same = compare(model, model, [(x, y)], quiet=True)
    assert same.agreement == 1.0 and same.images == 6 and same.reference_top1 == same.quantized_top1
    broken = compare(model, Broken(), [(x, y)], quiet=True)
    assert broken.non_finite == 1
    assert "logits are NaN or inf on 1 of 6 images" in capsys.readouterr().err
    assert top1(Broken(), [(x, y)], quiet=True) == pytest.approx(2 / 6)
    assert "NaN or inf on 1 of 6" in capsys.readouterr().err


def test_evaluate_an_artifact_a_packed_export_and_a_module(tiny_artifact, labelled, tmp_path):
    from vitqc.backends import export
    from vitqc.data import Preprocess
    from tests.conftest import TINY_PREPROCESS

    path, _ = tiny_artifact
    result = evaluate(path, labelled, quiet=True)
    assert result["kind"] == "artifact" and result["images"] == 12 and 0 <= result["agreement"] <= 1
    assert set(result["sqnr_db"]) and result["skipped_unreadable"] == 0
    packed = export(path, "packed", tmp_path / "packed_without_extension")
    on_packed = evaluate(packed, labelled, quiet=True)  # recognised by content; preprocessing travels with it
    assert on_packed["kind"] == "packed" and on_packed["top1"] == result["quantized_top1"]
    module = evaluate(tiny_vit(), labelled, preprocess=Preprocess(**TINY_PREPROCESS), quiet=True)
    assert module["kind"] == "model" and module["top1"] == result["reference_top1"]
