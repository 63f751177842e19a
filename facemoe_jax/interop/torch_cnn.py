"""PyTorch twins of `models/iresnet.py` and `models/mobilefacenet.py` under insightface names.

Written for this project (not copied): the module names, registration order and parameter shapes
are those of insightface arcface_torch's `backbones/iresnet.py` (`iresnet18` ... `iresnet200`) and
`backbones/mobilefacenet.py` (`get_mbf`, `get_mbf_large`), identical in FaceMoE's `backbones/`,
so one state_dict loads with `strict=True` into our twin, into the official classes and into the
Flax models through `interop/convert.py`. The official key lists are kept beside the tests
(tests/interop/data/insightface_*.tsv).

Like the Flax models these accept other input sizes than 112 (the last map is ceil(size / 16)
wide; IResNet's fc input and the MobileFaceNet GDC kernel follow it); at 112 they are the
official models. Training knobs the official classes have for PyTorch training only
(gradient checkpointing, `zero_init_residual`, autocast) are left out: these are for inference.
"""

from __future__ import annotations

import torch
from torch import nn

from facemoe_jax.models import registry
from facemoe_jax.models.iresnet import STAGE_BLOCKS, STAGE_WIDTHS
from facemoe_jax.models.mobilefacenet import output_side

BN_EPS = 1e-5


def _conv(cin, cout, kernel, stride=1, padding=0, groups=1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv(inplanes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv(planes, planes, 3, stride, 1)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = (
            nn.Sequential(_conv(inplanes, planes, 1, stride), nn.BatchNorm2d(planes, eps=BN_EPS))
            if downsample
            else None
        )

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNetTorch(nn.Module):
    """arcface_torch IResNet: (B, 3, S, S) in [-1, 1] -> (B, embed_dim)."""

    def __init__(self, depth=50, embed_dim=512, dropout=0.0, image_size=112):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"IResNet depth {depth} is not one of {sorted(STAGE_BLOCKS)}")
        self.conv1 = _conv(3, STAGE_WIDTHS[0], 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        inplanes = STAGE_WIDTHS[0]
        for stage, (planes, count) in enumerate(zip(STAGE_WIDTHS, STAGE_BLOCKS[depth])):
            blocks = [IBasicBlock(inplanes, planes, 2, downsample=True)]
            blocks += [IBasicBlock(planes, planes) for _ in range(1, count)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(inplanes * output_side(image_size) ** 2, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as arcface_torch: a constant 1

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, linear=False):
        super().__init__()
        parts = [_conv(cin, cout, kernel, stride, padding, groups), nn.BatchNorm2d(cout)]
        if not linear:
            parts.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*parts)

    def forward(self, x):
        return self.layers(x)


def LinearBlock(cin, cout, kernel=1, stride=1, padding=0, groups=1) -> ConvBlock:  # noqa: N802
    """arcface_torch's LinearBlock: conv + BatchNorm (same state_dict names as a ConvBlock)."""
    return ConvBlock(cin, cout, kernel, stride, padding, groups, linear=True)


class DepthWise(nn.Module):
    def __init__(self, cin, cout, hidden, stride=2, residual=False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, hidden),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            LinearBlock(hidden, cout),
        )

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, channels, num_block, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden, 1, residual=True) for _ in range(num_block))
        )

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embed_dim, side):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, side, groups=512),
            nn.Flatten(),
            nn.Linear(512, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNetTorch(nn.Module):
    """arcface_torch MobileFaceNet: (B, 3, S, S) in [-1, 1] -> (B, embed_dim)."""

    def __init__(self, blocks=(1, 4, 6, 2), scale=2, embed_dim=512, image_size=112):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        b0, b1, b2, b3 = blocks
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, 3, 2, 1),
                ConvBlock(c1, c1, 3, 1, 1, groups=64) if b0 == 1 else Residual(c1, b0, 128),
                DepthWise(c1, c1, 128),
                Residual(c1, b1, 128),
                DepthWise(c1, c2, 256),
                Residual(c2, b2, 256),
                DepthWise(c2, c2, 512),
                Residual(c2, b3, 256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embed_dim, output_side(image_size))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def iresnet_twin(cfg) -> IResNetTorch:
    """The twin of config.model.name="iresnet" (arcface_torch's `iresnet{depth}`)."""
    return IResNetTorch(cfg.depth, cfg.embed_dim, cfg.dropout, cfg.image_size)


def mobilefacenet_twin(cfg) -> MobileFaceNetTorch:
    """The twin of config.model.name="mobilefacenet" (arcface_torch's `get_mbf`)."""
    return MobileFaceNetTorch(
        tuple(cfg.mobilefacenet_blocks),
        cfg.mobilefacenet_scale,
        cfg.embed_dim,
        cfg.image_size,
    )


def torch_cnn_from_config(cfg) -> nn.Module:
    """The PyTorch twin of `build_model(cfg)` for an insightface CNN, in eval mode."""
    spec = registry.spec(cfg.name)
    if not spec.indexed_names:
        raise ValueError(f"config.model.name={cfg.name!r} is not an insightface CNN")
    return spec.twin()(cfg).eval()
