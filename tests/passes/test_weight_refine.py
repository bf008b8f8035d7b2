import torch

import vitqc
from tests.conftest import tiny_vit
from vitqc.pipeline import Pipeline
from vitqc.quant.modules import QUANT_LAYERS, QuantLinear


def test_refinement_moves_weights_by_at_most_one_step_and_materialize_stores_what_was_used(calib):
    pipe = Pipeline.from_list(["canonicalize", ("insert_quantizers", {"weight_bits": 4}), "weight_refine", "calibrate"])
    fake = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized
    layers = [m for m in fake.modules() if isinstance(m, QuantLinear)]
    assert all(m.refinement is not None and torch.count_nonzero(m.refinement) == 0 for m in layers)
    torch.manual_seed(0)
    for m in layers:  # as if training had moved them, some beyond the clamp
        m.refinement.data.uniform_(-2, 2)
    fc = fake.get_submodule("blocks.0.mlp.fc1")
    step = fc.weight_quantizer.scale_tensor(ndim=2)
    moved = (fc.refined_weight() - fc.effective_weight()).abs()
    assert (moved <= step * (1 + 1e-6)).all() and (moved > 0.5 * step).any()
    x = torch.cat(calib)
    with torch.no_grad():
        used = {name: m.quantized_weight() for name, m in fake.named_modules() if isinstance(m, QuantLinear)}
        student = fake(x)
    q = vitqc.compile(fake, "materialize", quiet=True, example=x[:1]).quantized
    with torch.no_grad():
        for name, weight in used.items():  # the stored integers are exactly the weights the student used
            assert torch.equal(q.get_submodule(name).dequantized_weight(), weight), name
        # and the integer program computes what the student did, up to float accumulation
        assert torch.equal(q(x).argmax(-1), student.argmax(-1))
    codes = q.get_submodule("blocks.0.mlp.fc1").weight_codes
    unrefined = fc.weight_quantizer.integer(fc.effective_weight().detach())
    assert not torch.equal(codes, unrefined)  # the refinement changed the stored integers


def test_refinement_penalty_value_and_gradient_are_autograds(calib):
    """RefinementPenalty adds the gradient autograd would give the weighted mean over layers of mean(delta^2)."""
    from vitqc.passes.weight_refine import RefinementPenalty

    pipe = Pipeline.from_list(["canonicalize", ("insert_quantizers", {"weight_bits": 4}), "weight_refine", "calibrate"])
    fake = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized
    layers = [m for m in fake.modules() if isinstance(m, QUANT_LAYERS)]  # the patch conv too
    torch.manual_seed(0)
    for m in layers:
        m.refinement.data.normal_(0, 0.3)
    weight = 0.25
    reference = weight * torch.stack([m.refinement.pow(2).mean() for m in layers]).mean()
    reference.backward()
    expected = {id(m): m.refinement.grad.clone() for m in layers}
    for i, m in enumerate(layers):  # half the layers start from an existing gradient, half from none
        m.refinement.grad = torch.ones_like(m.refinement) if i % 2 else None
    start = {id(m): (m.refinement.grad.clone() if m.refinement.grad is not None else 0.0) for m in layers}
    penalty = RefinementPenalty(fake, weight)
    assert penalty and len(penalty.offsets) == len(layers)
    torch.testing.assert_close(weight * penalty.value(), reference.detach(), rtol=1e-6, atol=0)
    penalty.add_grad()
    for m in layers:
        torch.testing.assert_close(m.refinement.grad, start[id(m)] + expected[id(m)], rtol=1e-6, atol=1e-9)
    assert not RefinementPenalty(fake, 0.0)
