"""Plain `torch.nn` twins of our encoders, for exported weights and for checking the export.

`SwinMoETorch` has exactly the parameter and buffer names, shapes and order of FaceMoE's
`swin_120_topk_moe_loss` (541 entries at full size), so a state_dict moves between it and the
official repository with `strict=True`. `ViTMoETorch` mirrors `models/vit.py` under insightface
arcface_torch names (`patch_embed.proj`, `pos_embed`, `blocks.{i}.attn.qkv`, `feature.{0..3}`);
its MoE blocks use the official FaceMoE MoE names (`mlp.experts.{e}.fc1`, `mlp.router.gate`).

The MoE here is written for clarity, not speed: each expert runs on the tokens routed to it and
the results are added back with their combine weights, the same arithmetic as the official loop.
The capacity path (tokens beyond an expert's per-image capacity dropped, first choices before
second choices) is reproduced so that exports of capacity-trained models embed identically.
The window geometry buffers come from `models/swin.py`, the one place they are defined.

Torch is imported only here and by the export code that needs it; training never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from facemoe_jax.models import registry
from facemoe_jax.models import swin as swin_geometry
from facemoe_jax.models.lora import settings_from_config
from facemoe_jax.models.moe import COMBINE_MODES
from facemoe_jax.models.vit import parse_moe_layers


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)


class MoEMlp(nn.Module):
    """Top-k MoE feed-forward: (B, N, C) -> (B, N, C).

    combine: "raw_logits" (official FaceMoE: the chosen logits are the weights), "softmax_topk"
    (softmax over the K chosen logits) or "softmax_all" (softmax over all E, at the K chosen).
    capacity_factor None = every token processed; otherwise each image (group) gives each expert
    at most ceil(factor * N * k / E) tokens, as `models/moe.py` does.
    """

    def __init__(self, dim, hidden, num_experts, top_k, combine, capacity_factor, activation):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"moe combine mode {combine!r} is not one of {COMBINE_MODES}")
        self.top_k, self.combine, self.capacity_factor = top_k, combine, capacity_factor
        self.experts = nn.ModuleList(Expert(dim, hidden, activation) for _ in range(num_experts))
        self.router = Router(dim, num_experts)

    def forward(self, x):
        b, n, c = x.shape
        num_experts = len(self.experts)
        logits = self.router.gate(x.float())  # (B, N, E)
        top_logits, index = torch.topk(logits, self.top_k, dim=-1)  # (B, N, K)
        if self.combine == "raw_logits":
            weights = top_logits
        elif self.combine == "softmax_all":  # Switch/vmoe: probabilities over all E experts
            weights = logits.softmax(-1).gather(-1, index)
        else:
            weights = top_logits.softmax(-1)
        if self.capacity_factor is not None:
            capacity = max(1, math.ceil(self.capacity_factor * n * self.top_k / num_experts))
            choice = F.one_hot(index, num_experts)  # (B, N, K, E)
            by_priority = choice.transpose(1, 2).reshape(b, self.top_k * n, num_experts)
            position = by_priority.cumsum(1) - 1
            position = position.reshape(b, self.top_k, n, num_experts).transpose(1, 2)
            slot = (position * choice).sum(-1)
            weights = torch.where(slot < capacity, weights, torch.zeros_like(weights))
        tokens = x.reshape(b * n, c)
        index, weights = index.reshape(b * n, -1), weights.reshape(b * n, -1)
        out = torch.zeros_like(tokens)
        # No branch on the number of routed tokens (an expert may get none): a traced ONNX
        # export then holds every expert, and the gathers / index_add take any row count.
        for e, expert in enumerate(self.experts):
            rows, choice = torch.nonzero(index == e, as_tuple=True)
            w = weights[rows, choice].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, rows, expert(tokens[rows]) * w)
        return out.reshape(b, n, c)


# ------------------------------------------------------------------------------------------------
# Swin-MoE (official names)


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * nW, w*w, C), as `models.swin.window_partition` (torch has no
    n-axis `transpose`)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows, window: int, height: int, width: int):
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class LoRALinear(nn.Linear):
    """nn.Linear plus PETALface's adapters (official names `trainable_lora_down` / `_up`, and
    `..._down2` / `_up2` when two are mixed by the per-image quality `a`); eval mode (no dropout).
    The same computation as `models.lora.LoRADense`."""

    def __init__(self, in_features, out_features, rank, scale=1.0, quality_mix=True, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.scale, self.quality_mix = scale, quality_mix
        self.trainable_lora_down = nn.Linear(in_features, rank, bias=False)
        self.trainable_lora_up = nn.Linear(rank, out_features, bias=False)
        if quality_mix:
            self.trainable_lora_down2 = nn.Linear(in_features, rank, bias=False)
            self.trainable_lora_up2 = nn.Linear(rank, out_features, bias=False)

    def forward(self, x, a=None):
        y = super().forward(x)
        if not self.quality_mix:
            return y + self.scale * self.trainable_lora_up(self.trainable_lora_down(x))
        a = a.reshape(a.shape + (1,) * (x.dim() - a.dim())).to(x.dtype)
        y = y + self.scale * self.trainable_lora_up(self.trainable_lora_down((1 - a) * x))
        return y + self.scale * self.trainable_lora_up2(self.trainable_lora_down2(a * x))


def linear(in_features, out_features, lora, target, bias=True):
    """nn.Linear, or LoRALinear where the LoRA settings adapt `target` ("qkv", "proj", "mlp")."""
    if lora is None or target not in lora.targets:
        return nn.Linear(in_features, out_features, bias=bias)
    return LoRALinear(in_features, out_features, lora.rank, lora.scale, lora.quality_mix, bias)


def call(layer, x, a):
    return layer(x, a) if isinstance(layer, LoRALinear) else layer(x)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, num_heads: int, lora=None):
        super().__init__()
        self.window, self.num_heads = window, num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        index = torch.from_numpy(swin_geometry.relative_position_index(window))
        self.register_buffer("relative_position_index", index)
        self.qkv = linear(dim, 3 * dim, lora, "qkv")
        self.proj = linear(dim, dim, lora, "proj")

    def forward(self, x, mask=None, a=None):
        bw, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = call(self.qkv, x, a)
        q, k, v = qkv.reshape(bw, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.reshape(bw, self.num_heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return call(self.proj, out, a)


class SwinBlock(nn.Module):
    def __init__(
        self,
        dim,
        resolution,
        num_heads,
        window,
        shift,
        moe: dict | None,
        mlp_ratio,
        lora=None,
        apply_shift_mask=True,
    ):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.apply_shift_mask = apply_shift_mask
        if shift:  # registered first, as the official block does (state_dict order)
            mask = swin_geometry.shifted_window_mask(resolution, window, shift)
            self.register_buffer("attn_mask", torch.from_numpy(mask))
        else:
            self.attn_mask = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, lora)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if moe is None:  # a dense Swin block (PETALface's base, pre-training before upcycling)
            self.mlp = Mlp(dim, hidden, activation=nn.GELU(), lora=lora)
        else:
            self.mlp = MoEMlp(dim, hidden, activation=nn.GELU(), **moe)

    def forward(self, x, a=None):
        b, length, c = x.shape
        side, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).reshape(b, side, side, c)
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        mask = self.attn_mask if self.apply_shift_mask else None  # PETALface: never applied
        window_a = None if a is None else a.repeat_interleave((side // w) ** 2)
        y = self.attn(window_partition(y, w), mask, window_a)
        y = window_reverse(y, w, side, side)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + y.reshape(b, length, c)
        y = self.norm2(x)
        return x + (self.mlp(y, a) if isinstance(self.mlp, Mlp) else self.mlp(y))


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        b, _, c = x.shape
        x = x.reshape(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim,
        resolution,
        depth,
        num_heads,
        window_size,
        moe,
        mlp_ratio,
        downsample,
        moe_blocks=None,
        lora=None,
        apply_shift_mask=True,
    ):
        super().__init__()
        window, shift = swin_geometry.effective_window(resolution, window_size)
        moe_blocks = range(depth) if moe_blocks is None else moe_blocks
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                resolution,
                num_heads,
                window,
                shift if i % 2 else 0,
                moe if i in moe_blocks else None,
                mlp_ratio,
                lora,
                apply_shift_mask,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x, a=None):
        for block in self.blocks:
            x = block(x, a)
        return x if self.downsample is None else self.downsample(x)


class SwinMoETorch(nn.Module):
    """FaceMoE Swin-MoE, eval-mode forward: (B, 3, H, W) in [-1, 1] -> (B, embed_dim)."""

    def __init__(
        self,
        image_size=120,
        patch_size=6,
        width=384,
        depths=(2, 18, 2),
        num_heads=(8, 16, 16),
        window_size=5,
        mlp_ratio=4.0,
        embed_dim=512,
        num_experts=3,
        top_k=2,
        router_combine="raw_logits",
        capacity_factor=None,
        head_dropout=0.25,
        moe_layers=None,  # MoE blocks numbered over all stages; None = every block (official)
        absolute_pos_embed=True,
        apply_shift_mask=True,  # False: PETALface's Swin (mask computed, never applied)
        lora=None,  # models.lora.LoRASettings: PETALface's adapters
    ):
        super().__init__()
        grid = image_size // patch_size
        moe_layers = range(sum(depths)) if moe_layers is None else moe_layers
        self.lora = lora
        self.patch_embed = PatchEmbed(patch_size, width)
        if absolute_pos_embed:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        else:
            self.absolute_pos_embed = None
        moe = {
            "num_experts": num_experts,
            "top_k": top_k,
            "combine": router_combine,
            "capacity_factor": capacity_factor,
        }
        resolutions = swin_geometry.stage_resolutions(grid, len(depths))
        self.layers = nn.ModuleList(
            SwinStage(
                width * 2**i,
                resolutions[i],
                depth,
                num_heads[i],
                window_size,
                moe,
                mlp_ratio,
                downsample=i < len(depths) - 1,
                moe_blocks=[
                    b - sum(depths[:i])
                    for b in moe_layers
                    if sum(depths[:i]) <= b < sum(depths[: i + 1])
                ],
                lora=lora,
                apply_shift_mask=apply_shift_mask,
            )
            for i, depth in enumerate(depths)
        )
        final_width = width * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(final_width)
        flat = final_width * resolutions[-1] ** 2
        self.feature_layer = nn.Sequential(
            nn.BatchNorm1d(flat),
            nn.Dropout(head_dropout),
            LoRALinear(flat, embed_dim, lora.rank, lora.scale, quality_mix=False)
            if lora is not None and lora.head
            else nn.Linear(flat, embed_dim),
            nn.BatchNorm1d(embed_dim),
        )

    def forward(self, images, quality=None):
        """quality: PETALface's per-image `a` (B,), required by quality-mixed adapters."""
        if self.lora is not None and self.lora.quality_mix and quality is None:
            raise ValueError("this Swin has quality-mixed adapters: pass quality=a (B,)")
        x = self.patch_embed(images)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        for layer in self.layers:
            x = layer(x, quality)
        return self.feature_layer(self.norm(x).flatten(1))


# ------------------------------------------------------------------------------------------------
# ViT-MoE (insightface names)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: nn.Module | None = None, lora=None):
        super().__init__()
        self.fc1 = linear(dim, hidden, lora, "mlp")
        self.act = nn.ReLU6() if activation is None else activation
        self.fc2 = linear(hidden, dim, lora, "mlp")

    def forward(self, x, a=None):
        return call(self.fc2, self.act(call(self.fc1, x, a)), a)


class VitPatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, moe: dict | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        if moe is None:
            self.mlp = Mlp(dim, hidden)
        else:
            self.mlp = MoEMlp(dim, hidden, activation=nn.ReLU6(), **moe)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTMoETorch(nn.Module):
    """Our ViT-MoE under insightface names, eval-mode forward: (B, 3, H, W) -> (B, embed_dim)."""

    def __init__(
        self,
        image_size=112,
        patch_size=9,
        width=512,
        depth=24,
        num_heads=8,
        mlp_ratio=4.0,
        embed_dim=512,
        moe_layers=(),
        num_experts=8,
        top_k=2,
        router_combine="softmax_topk",
        capacity_factor=None,
    ):
        super().__init__()
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = VitPatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        moe = {
            "num_experts": num_experts,
            "top_k": top_k,
            "combine": router_combine,
            "capacity_factor": capacity_factor,
        }
        hidden = int(width * mlp_ratio)
        self.blocks = nn.ModuleList(
            VitBlock(width, num_heads, hidden, moe if i in moe_layers else None)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.feature = nn.Sequential(
            nn.Linear(width * tokens, width, bias=False),
            nn.BatchNorm1d(width, eps=2e-5),
            nn.Linear(width, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
        )

    def forward(self, images):
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.feature(self.norm(x).flatten(1))


def swin_twin(cfg) -> SwinMoETorch:
    """The twin of config.model.name="swin_moe" (the official FaceMoE names)."""
    return SwinMoETorch(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.stage_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        router_combine=cfg.router_combine,
        capacity_factor=cfg.capacity_factor or None,
        head_dropout=cfg.head_dropout,
        moe_layers=parse_moe_layers(cfg.moe_layers, sum(cfg.depths)),
        absolute_pos_embed=bool(cfg.absolute_pos_embed),
        apply_shift_mask=bool(cfg.apply_shift_mask),
        lora=settings_from_config(cfg),
    )


def vit_twin(cfg) -> ViTMoETorch:
    """The twin of config.model.name="vit_moe" (insightface ViT names, FaceMoE's MoE names)."""
    return ViTMoETorch(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim,
        moe_layers=parse_moe_layers(cfg.moe_layers, cfg.depth),
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        router_combine=cfg.router_combine,
        capacity_factor=cfg.capacity_factor or None,
    )


def torch_model_from_config(cfg) -> nn.Module:
    """The PyTorch twin of `models.build_model(cfg)` (cfg = config.model), in eval mode; the
    registry (models/registry.py) names each model's twin."""
    return registry.spec(cfg.name).twin()(cfg).eval()


def numpy_state_dict(module: nn.Module) -> dict[str, np.ndarray]:
    """state_dict as numpy arrays (float tensors as float32)."""
    out = {}
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).numpy()
    return out
