"""Small random-weight instances of every architecture family vitqc is checked on.

The coverage benchmark (``benchmarks/coverage.py``) and the unit tests (``tests/test_architectures.py``) build
their models from here, so both check the same graphs. Each :class:`Arch` builds its model in eval mode with a
fixed seed, at a few dozen channels and one or two blocks per stage: every kind of layer the full-size model has
is present, nothing is downloaded. ``source`` is where the model comes from: ``timm``, ``hf`` (a transformers
model, which callers may round-trip through ``save_pretrained`` and ``hf:DIR``), ``torchvision``, ``torch``
(built from ``torch.nn`` modules) or ``pt2`` (a ``torch.export`` program, as ``vitqc`` loads a ``.pt2`` file).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Arch", "ARCHITECTURES", "get", "names", "TransformerEncoderViT"]


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # what the row stands for ("timm SwinV2", "HF DeiT + teacher", ...)
    source: str  # timm | hf | torchvision | torch | pt2
    build: Callable[[], nn.Module] = field(repr=False)
    img_size: int = 32
    channels: int = 3
    unit_test: bool = True  # False: only the benchmark builds it (slow to export, family covered otherwise)
    load_kwargs: dict = field(default_factory=dict)  # hf: what `hf:DIR` needs to load it as built (not saved by HF)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        module = self.build()
        try:
            module.eval()
        except NotImplementedError:  # torch.export programs are in eval mode already
            pass
        return module

    def example(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.channels, self.img_size, self.img_size, generator=gen)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **{"num_classes": 10, **kwargs})

    return build


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _hf(kind: str, attn: str = "sdpa") -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T

        common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=10, attn_implementation=attn)
        if kind == "vit":
            return T.ViTForImageClassification(T.ViTConfig(**common))
        if kind == "deit":
            return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**common))
        if kind == "dinov2":
            return T.Dinov2ForImageClassification(T.Dinov2Config(**common))
        if kind == "dinov2-backbone":
            return T.Dinov2Model(T.Dinov2Config(**common))
        if kind == "beit":
            return T.BeitForImageClassification(T.BeitConfig(**common, use_relative_position_bias=True))
        if kind == "swin":
            return T.SwinForImageClassification(T.SwinConfig(
                image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                num_labels=10, attn_implementation=attn))
        raise KeyError(kind)

    return build


def _mobilevit() -> nn.Module:
    """timm's mobilevit_xxs design at two stages: inverted residuals, then a MobileViT block (conv, unfold into
    patches, two transformer blocks, fold, fuse) that timm registers as a no-trace leaf."""
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    cfg = ByoModelCfg(blocks=(_inverted_residual_block(d=1, c=16, s=2, br=2.0),
                              _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=2, patch_size=2,
                                               br=2.0)),
                      stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=48)
    return ByobNet(cfg, num_classes=10)


def _torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: outputs would be 0
    return model


def _torchvision_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=10, stochastic_depth_prob=0.0)


class TransformerEncoderViT(nn.Module):
    """A ViT written with ``nn.TransformerEncoder``: conv patch embedding, class token, encoder, linear head."""

    def __init__(self, img_size: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2,
                 classes: int = 10, norm_first: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        return self.head(x[:, 0] if self.batch_first else x[0])


def _pt2(build: Callable[[], nn.Module], img_size: int) -> Callable[[], nn.Module]:
    """``build()`` exported with a dynamic batch, saved and loaded back (what ``vitqc`` does with a .pt2 file)."""
    def program() -> nn.Module:
        model = build().eval()
        x = torch.randn(2, 3, img_size, img_size)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
        buffer.seek(0)
        return torch.export.load(buffer).module()

    return program


ARCHITECTURES: dict[str, Arch] = {a.name: a for a in [
    Arch("vit", "timm ViT", "timm", _timm("vit_tiny_patch16_224", **_VIT)),
    Arch("deit", "timm DeiT", "timm", _timm("deit_tiny_patch16_224", **_VIT)),
    Arch("deit_distilled", "timm DeiT distilled (two heads)", "timm", _timm("deit_tiny_distilled_patch16_224", **_VIT)),
    Arch("deit3", "timm DeiT-III (layer scale)", "timm", _timm("deit3_small_patch16_224", **_VIT)),
    Arch("dinov2", "timm DINOv2", "timm", _timm("vit_small_patch14_dinov2", img_size=28, patch_size=7, embed_dim=32,
                                                 depth=2, num_heads=2), img_size=28),
    Arch("vit_reg", "timm ViT with register tokens", "timm",
         _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2),
         img_size=28),
    Arch("siglip_map", "timm SigLIP attention pool", "timm",
         _timm("vit_base_patch16_siglip_224", **_VIT)),
    Arch("swin", "timm Swin", "timm", _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                             embed_dim=16, depths=(1, 1), num_heads=(1, 2))),
    Arch("swinv2", "timm SwinV2 (qkv as F.linear)", "timm",
         _timm("swinv2_tiny_window8_256", img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1),
               num_heads=(1, 2))),
    Arch("beit", "timm BEiT (qkv as F.linear)", "timm", _timm("beit_base_patch16_224", **_VIT)),
    Arch("eva02", "timm EVA-02 (qkv as F.linear, rope)", "timm",
         _timm("eva02_tiny_patch14_224", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2), img_size=28),
    Arch("levit", "timm LeViT", "timm", _timm("levit_128s", img_size=32, embed_dim=(32, 48, 64), key_dim=8,
                                               num_heads=(2, 2, 2), depth=(1, 1, 1))),
    Arch("pvt_v2", "timm PVT-v2", "timm", _timm("pvt_v2_b0", embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1),
                                                 num_heads=(1, 1, 2, 2)), img_size=64),
    Arch("cait", "timm CaiT (class attention)", "timm", _timm("cait_xxs24_224", depth_token_only=1, **_VIT)),
    Arch("xcit", "timm XCiT (cross-covariance attention)", "timm",
         _timm("xcit_nano_12_p16_224", img_size=32, embed_dim=32, depth=2, num_heads=2)),
    Arch("mobilevit", "timm MobileViT (timm keeps its blocks whole)", "timm", _mobilevit),
    Arch("convit", "timm ConViT (gated positional attention)", "timm", _timm("convit_tiny", **_VIT)),
    Arch("pit", "timm PiT (pooling stages)", "timm", _timm("pit_ti_224", img_size=32, patch_size=8, stride=4,
                                                          base_dims=[16, 16], depth=[1, 1], heads=[2, 2])),
    Arch("twins", "timm Twins-SVT (locally grouped attention)", "timm",
         _timm("twins_svt_small", embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), mlp_ratios=(2, 2),
               sr_ratios=(2, 1), wss=(2, 2)), unit_test=False),
    Arch("hf_vit", "HF ViT", "hf", _hf("vit")),
    Arch("hf_vit_eager", "HF ViT (eager attention)", "hf", _hf("vit", "eager"),
         load_kwargs={"attn_implementation": "eager"}),
    Arch("hf_deit", "HF DeiT + teacher (distillation head)", "hf", _hf("deit")),
    Arch("hf_dinov2", "HF DINOv2", "hf", _hf("dinov2")),
    Arch("hf_dinov2_backbone", "HF DINOv2 backbone (pooled output)", "hf", _hf("dinov2-backbone")),
    Arch("hf_swin", "HF Swin", "hf", _hf("swin")),
    Arch("hf_beit", "HF BEiT (relative position bias, eager attention)", "hf", _hf("beit", "eager"),
         load_kwargs={"attn_implementation": "eager"}),
    Arch("tv_vit", "torchvision vit_b_16-style (nn.MultiheadAttention)", "torchvision", _torchvision_vit),
    Arch("tv_swin", "torchvision Swin", "torchvision", _torchvision_swin),
    Arch("torch_encoder", "nn.TransformerEncoder ViT (pre-norm, batch first)", "torch", TransformerEncoderViT),
    Arch("torch_encoder_postnorm", "nn.TransformerEncoder ViT (post-norm, sequence first)", "torch",
         lambda: TransformerEncoderViT(norm_first=False, batch_first=False)),
    Arch("pt2_vit", "torch.export program (.pt2) of a timm ViT", "pt2",
         _pt2(_timm("vit_tiny_patch16_224", **_VIT), 32)),
]}


def names(source: str | None = None, unit_test: bool | None = None) -> list[str]:
    return [n for n, a in ARCHITECTURES.items() if (source is None or a.source == source)
            and (unit_test is None or a.unit_test == unit_test)]


def get(name: str) -> Arch:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None
