import torch
from torch import nn

import vitqc
from tests.conftest import assert_close_but_for_code_flips, tiny_vit
from vitqc.passes.insert_quantizers import quantizers
from vitqc.pipeline import Pipeline
from vitqc.quant.modules import ChannelFactors, RescaledLayerNorm

PREFIX = ["canonicalize", "insert_quantizers"]


def rescaled(model, calib, **options):
    """Quantizers inserted but disabled (FP), then channel_rescale: must compute exactly the FP function."""
    gm = vitqc.compile(model, Pipeline.from_list(PREFIX + [("channel_rescale", options)]), calib, quiet=True).quantized
    for q in quantizers(gm).values():
        q.enabled = False
    return gm


def max_diff(a, b, x):
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def test_vit_folds_layernorms_and_values_exactly(calib):
    model = tiny_vit()
    gm = rescaled(model, calib)
    record = gm.meta["vitqc"]["record"]["channel_rescale"]
    kinds = sorted((f["kind"], f["producer"]) for f in record["folds"])
    assert kinds == [("attention_values", "blocks.0.attn.qkv"), ("attention_values", "blocks.1.attn.qkv"),
                     ("layernorm", "blocks.0.norm1"), ("layernorm", "blocks.0.norm2"),
                     ("layernorm", "blocks.1.norm1"), ("layernorm", "blocks.1.norm2"),
                     ("layernorm", "norm")]  # the final norm feeds the head through the class-token slice
    assert isinstance(gm.get_submodule("blocks.0.norm1"), RescaledLayerNorm)
    assert gm.get_submodule("blocks.0.attn.qkv").input_factors is gm.get_submodule("blocks.0.norm1").factors
    factors = gm.get_submodule("blocks.0.norm1").factors()
    assert not torch.allclose(factors, torch.ones_like(factors))  # SmoothQuant init really rescales
    assert max_diff(gm, model, torch.cat(calib)) <= 1e-5


def test_smoothquant_init_balances_activation_and_weight_ranges(calib):
    gm = rescaled(tiny_vit(), calib, alpha=0.5)
    fc1 = gm.get_submodule("blocks.0.mlp.fc1")
    hits = {}
    h = fc1.register_forward_pre_hook(lambda m, a: hits.setdefault("x", a[0].abs().flatten(0, -2).amax(0)))
    with torch.no_grad():
        gm(torch.cat(calib)[:64])
    h.remove()
    w = fc1.effective_weight().abs().amax(0)
    # with alpha = 0.5 the migrated activation and weight column ranges are equal per channel
    assert torch.allclose(hits["x"], w, rtol=1e-3)




def test_alpha_zero_evens_out_weight_columns_and_stays_exact(calib):
    # joint-w1.58a8 ships alpha = 0: no activation range moves into the ternary weights; each input column of
    # the consumers is scaled to max |w| = 1 (fc1 is the only consumer of norm2, so exactly 1 for every column)
    model = tiny_vit()
    gm = rescaled(model, calib, alpha=0.0)
    w = gm.get_submodule("blocks.0.mlp.fc1").effective_weight().abs().amax(0)
    assert torch.allclose(w, torch.ones_like(w), rtol=1e-5)
    assert max_diff(gm, model, torch.cat(calib)) <= 1e-5
def test_layer_scale_and_swin_and_post_norm_are_exact(calib):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    dinov2 = tiny_vit(init_values=1e-1)
    for block in dinov2.blocks:
        block.ls1.gamma.data.uniform_(-1, 1)
        block.ls2.gamma.data.uniform_(-1, 1)
    gm = rescaled(dinov2, calib)
    assert len(gm.meta["vitqc"]["record"]["channel_rescale"]["folds"]) == 7
    assert max_diff(gm, dinov2, torch.cat(calib)) <= 1e-5

    swin = SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                           num_classes=5).eval()
    x = torch.randn(8, 3, 16, 16)
    gm = rescaled(swin, list(x.split(4)))
    folds = gm.meta["vitqc"]["record"]["channel_rescale"]["folds"]
    assert sum(f["kind"] == "layernorm" and f["producer"].endswith("norm1") for f in folds) == 4  # through windows
    assert max_diff(gm, swin, x) <= 1e-5


def test_post_norm_layernorm_feeding_the_residual_is_not_folded(calib):
    class PostNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.norm(x)
            return y + self.fc(y)  # the norm output also feeds the add: no exact fold

    model = PostNorm().eval()
    x = torch.randn(4, 3, 8)
    gm = vitqc.compile(model, Pipeline.from_list(PREFIX + ["channel_rescale"]), [x], quiet=True).quantized
    assert gm.meta["vitqc"]["record"]["channel_rescale"]["folds"] == []


def test_materialize_folds_factors_into_layernorm_and_weights(calib):
    pipe = Pipeline.from_list(PREFIX + ["channel_rescale", "calibrate"])
    fake = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized
    x = torch.cat(calib)
    with torch.no_grad():
        before = fake(x)
    q = vitqc.compile(fake, "materialize", quiet=True, example=x[:1]).quantized
    assert type(q.get_submodule("blocks.0.norm1")) is nn.LayerNorm
    assert not any(isinstance(m, ChannelFactors) for m in q.modules())
    with torch.no_grad():
        after = q(x)
    assert_close_but_for_code_flips(after, before, rtol=1e-4, argmax=0.95)  # folded factors + integer accumulation


def test_factors_receive_gradients_when_quantized(calib):
    gm = vitqc.compile(tiny_vit(), Pipeline.from_list(PREFIX + ["channel_rescale", "calibrate"]), calib, quiet=True).quantized
    out = gm(torch.cat(calib)[:8])
    out.square().mean().backward()
    grad = gm.get_submodule("blocks.0.norm1").factors.log_factors.grad
    assert grad is not None and grad.abs().sum() > 0
