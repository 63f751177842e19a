"""The model registry: the one place a `config.model.name` is dispatched.

Each name has a `ModelSpec`: the builder (which validates config.model first, errors naming the
field), the PyTorch twin and the rules of the state_dict it exchanges with it (head module
names, buffers PyTorch keeps that follow from the config, constant parameters), and how a run
of it is exported. Conversion (`interop/convert.py`), the twins (`interop/torch_models.py`), the
export (`export/workdir.py`) and the encoder ask the registry; none of them compares names.

The twins live above models/ (interop/) and torch is optional, so a spec names its twin as
"module:function" and `ModelSpec.twin()` imports it when asked.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_collections

from facemoe_jax.kernels import winograd
from facemoe_jax.models.onnx_graph import (
    BATCHNORM_MODES,
    OnnxModel,
    input_normalization,
    load_graph,
    stem_nodes,
)
from facemoe_jax.models.quality import QualitySettings, estimator
from facemoe_jax.models.iresnet import STAGE_BLOCKS, IResNet
from facemoe_jax.models.lora import settings_from_config
from facemoe_jax.models.mobilefacenet import MobileFaceNet
from facemoe_jax.models.moe import COMBINE_MODES
from facemoe_jax.models.recognizability import QUALITY_INPUTS, HeadSettings
from facemoe_jax.models.swin import SwinMoE, effective_window, stage_resolutions
from facemoe_jax.models.vit import ViTMoE, parse_moe_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_dtype_and_patch(cfg: ml_collections.ConfigDict) -> None:
    """The fields every encoder shares: activation dtype and patch size."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    # A stride-p conv keeps image_size // p patches per side (ViT-B/9 on 112: 12 x 12, the last
    # 4 pixel rows and columns unused, as in insightface), so only p > image_size is an error.
    if not 1 <= cfg.patch_size <= cfg.image_size:
        raise ValueError(
            f"config.model.patch_size={cfg.patch_size} must be between 1 and "
            f"config.model.image_size={cfg.image_size}"
        )


def _check_routing(cfg: ml_collections.ConfigDict) -> None:
    """The MoE fields: experts, top-k, combine rule and capacity factor."""
    if cfg.num_experts < 1:
        raise ValueError(f"config.model.num_experts={cfg.num_experts} must be at least 1")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(
            f"config.model.top_k={cfg.top_k} is impossible with "
            f"config.model.num_experts={cfg.num_experts} (need 1 <= top_k <= experts)"
        )
    if cfg.router_combine not in COMBINE_MODES:
        raise ValueError(
            f"config.model.router_combine={cfg.router_combine!r} is not one of {COMBINE_MODES}"
        )
    if cfg.router_combine == "softmax_topk" and cfg.top_k == 1:
        raise ValueError(
            "config.model.router_combine='softmax_topk' with config.model.top_k=1 gives every "
            "token weight 1 and the router no gradient: use 'softmax_all' (Switch) or 'raw_logits'"
        )
    if cfg.capacity_factor < 0:
        raise ValueError(
            f"config.model.capacity_factor={cfg.capacity_factor} must be >= 0 (0 = dropless)"
        )


def _adapters(cfg: ml_collections.ConfigDict, allowed=("qkv", "proj", "mlp")) -> dict:
    """The LoRA and quality fields every encoder takes (config.model.lora); `allowed`: the
    adapter places this model has."""
    lora = settings_from_config(cfg)
    if lora is None:
        return {}
    other = [t for t in lora.targets if t not in allowed]
    if other:
        raise ValueError(
            f"config.model.lora.where={cfg.lora.where!r}: {other} are not places of a "
            f"model.name={cfg.name!r} ({', '.join(allowed)})"
        )
    if lora.head and "pointwise" in allowed:
        raise ValueError(
            "config.model.lora.head=True: an ONNX graph's head is adapted as one of its "
            "pointwise convolutions (where='pointwise')"
        )
    fields = cfg.lora
    sign = float(fields.quality_sign)
    if sign not in (1.0, -1.0):
        raise ValueError(f"config.model.lora.quality_sign={sign} must be 1 or -1")
    if lora.quality_mix:
        estimator(str(fields.quality))  # fails here, by name
    return {
        "lora": lora,
        "quality": QualitySettings(
            estimator=str(fields.quality),
            threshold=float(fields.quality_threshold),
            sign=sign,
        ),
    }


def _heads(cfg: ml_collections.ConfigDict) -> dict:
    """The recognizability heads (config.model.perceptibility_attention / quality_head); none
    by default, and then the encoder's parameters and outputs are exactly as without them."""
    heads = HeadSettings(
        perceptibility_attention=bool(cfg.perceptibility_attention),
        quality_head=bool(cfg.quality_head),
        quality_dropout=float(cfg.quality_head_dropout),
        quality_input=str(cfg.quality_head_input),
        quality_norm_scale=float(cfg.quality_head_norm_scale),
    )
    if heads.quality_input not in QUALITY_INPUTS:
        raise ValueError(
            f"config.model.quality_head_input={heads.quality_input!r} is not one of "
            f"{QUALITY_INPUTS}"
        )
    if heads.quality_norm_scale <= 0:
        raise ValueError(
            f"config.model.quality_head_norm_scale={heads.quality_norm_scale} must be > 0"
        )
    if not 0.0 <= heads.quality_dropout < 1.0:
        raise ValueError(
            f"config.model.quality_head_dropout={heads.quality_dropout} must be in [0, 1)"
        )
    return {"heads": heads}


def build_vit(cfg: ml_collections.ConfigDict) -> ViTMoE:
    """The ViT-MoE (config.model.name="vit_moe"); `config.model.moe_layers` picks the MoE
    blocks."""
    _check_dtype_and_patch(cfg)
    if cfg.width % cfg.num_heads:
        raise ValueError(
            f"config.model.width={cfg.width} is not divisible by "
            f"config.model.num_heads={cfg.num_heads}"
        )
    moe_layers = parse_moe_layers(cfg.moe_layers, cfg.depth)
    if moe_layers:
        _check_routing(cfg)
    return ViTMoE(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim,
        moe_layers=moe_layers,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        router_combine=cfg.router_combine,
        capacity_factor=cfg.capacity_factor or None,
        drop_path_rate=cfg.drop_path_rate,
        dtype=DTYPES[cfg.dtype],
        **_adapters(cfg),
        **_heads(cfg),
    )


def build_swin(cfg: ml_collections.ConfigDict) -> SwinMoE:
    """The official FaceMoE Swin-MoE (config.model.name="swin_moe"); `config.model.moe_layers`
    picks the MoE blocks, numbered over all stages ("all" = official FaceMoE, "none" = a dense
    Swin: the pre-training model before upcycling, and PETALface's base)."""
    for field in ("depths", "stage_heads", "window_size", "head_dropout"):
        if field not in cfg:
            raise ValueError(f"config.model.{field} is required for config.model.name='swin_moe'")
    _check_dtype_and_patch(cfg)
    depths, heads = tuple(cfg.depths), tuple(cfg.stage_heads)
    if not depths or len(heads) != len(depths) or min(depths) < 1:
        raise ValueError(
            f"config.model.depths={depths} and config.model.stage_heads={heads} must be "
            "non-empty, of equal length, with every depth >= 1"
        )
    grid = cfg.image_size // cfg.patch_size
    if grid % 2 ** (len(depths) - 1):
        raise ValueError(
            f"config.model.image_size={cfg.image_size} // patch_size={cfg.patch_size} = {grid} "
            f"patches per side cannot be halved {len(depths) - 1} times (patch merging)"
        )
    for i, side in enumerate(stage_resolutions(grid, len(depths))):
        window, _ = effective_window(side, cfg.window_size)
        if side % window:
            raise ValueError(
                f"config.model.window_size={cfg.window_size} does not tile stage {i} "
                f"({side}x{side} tokens)"
            )
        if (cfg.width * 2**i) % heads[i]:
            raise ValueError(
                f"stage {i} width {cfg.width * 2**i} (config.model.width={cfg.width}) is not "
                f"divisible by config.model.stage_heads[{i}]={heads[i]}"
            )
    moe_layers = parse_moe_layers(cfg.moe_layers, sum(depths))
    if moe_layers:
        _check_routing(cfg)
    return SwinMoE(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depths=depths,
        num_heads=heads,
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        embed_dim=cfg.embed_dim,
        moe_layers=moe_layers,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        router_combine=cfg.router_combine,
        capacity_factor=cfg.capacity_factor or None,
        drop_path_rate=cfg.drop_path_rate,
        head_dropout=cfg.head_dropout,
        dtype=DTYPES[cfg.dtype],
        absolute_pos_embed=bool(cfg.absolute_pos_embed),
        apply_shift_mask=bool(cfg.apply_shift_mask),
        **_adapters(cfg),
        **_heads(cfg),
    )


def _check_cnn(cfg: ml_collections.ConfigDict) -> None:
    """insightface arcface_torch's CNNs; config.model.dtype="bfloat16" is the official
    fp16=True."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.image_size < 16:
        raise ValueError(
            f"config.model.image_size={cfg.image_size} is too small for {cfg.name!r} (four "
            "stride-2 stages; the official models take 112)"
        )


def _conv_algorithm(cfg: ml_collections.ConfigDict) -> str:
    if cfg.conv_algorithm not in winograd.ALGORITHMS:
        raise ValueError(
            f"config.model.conv_algorithm={cfg.conv_algorithm!r} is not one of "
            f"{winograd.ALGORITHMS}"
        )
    return str(cfg.conv_algorithm)


def build_iresnet(cfg: ml_collections.ConfigDict) -> IResNet:
    """arcface_torch's IResNet: config.model.depth 18, 34, 50, 100 or 200, head dropout
    config.model.dropout."""
    _check_cnn(cfg)
    if cfg.depth not in STAGE_BLOCKS:
        raise ValueError(
            f"config.model.depth={cfg.depth} is not an IResNet depth "
            f"(one of {sorted(STAGE_BLOCKS)})"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"config.model.dropout={cfg.dropout} must be in [0, 1)")
    return IResNet(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        image_size=cfg.image_size,
        dtype=DTYPES[cfg.dtype],
        conv_algorithm=_conv_algorithm(cfg),
        **_heads(cfg),
    )


def build_mobilefacenet(cfg: ml_collections.ConfigDict) -> MobileFaceNet:
    """arcface_torch's MobileFaceNet: config.model.mobilefacenet_blocks / mobilefacenet_scale
    (1, 4, 6, 2) / 2 = `mbf`, (2, 8, 12, 4) / 4 = `mbf_large`."""
    _check_cnn(cfg)
    blocks = tuple(cfg.mobilefacenet_blocks)
    scale = cfg.mobilefacenet_scale
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f"config.model.mobilefacenet_blocks={blocks} must be 4 block counts >= 1")
    if scale < 1:
        raise ValueError(f"config.model.mobilefacenet_scale={scale} must be >= 1")
    return MobileFaceNet(
        blocks=blocks,
        scale=scale,
        embed_dim=cfg.embed_dim,
        image_size=cfg.image_size,
        dtype=DTYPES[cfg.dtype],
        **_heads(cfg),
    )


def build_onnx(cfg: ml_collections.ConfigDict) -> OnnxModel:
    """Any ONNX face model (config.model.onnx_path) as a Flax module whose parameters are the
    graph's initializers (models/onnx_graph.py). config.model.image_size and embed_dim must be
    the graph's; onnx_input_mean / onnx_input_std (pixel units, negative = the graph's default)
    and onnx_channel_order say how it wants its input; onnx_batchnorm inserts BatchNorms after
    its convolutions (OnnxModel.batchnorm)."""
    path = str(cfg.onnx_path)
    if not path:
        raise ValueError("config.model.name='onnx' needs config.model.onnx_path=/path/model.onnx")
    if not os.path.isfile(path):
        raise ValueError(f"config.model.onnx_path={path!r} does not exist")
    graph = load_graph(path)
    for field, value in (("image_size", graph.image_size), ("embed_dim", graph.output_dim)):
        if value and int(cfg[field]) != value:
            raise ValueError(
                f"config.model.{field}={cfg[field]} but {path} has {value} (set "
                f"--config.model.{field}={value})"
            )
    order = str(cfg.onnx_channel_order)
    if order not in ("RGB", "BGR"):
        raise ValueError(f"config.model.onnx_channel_order={order!r} must be 'RGB' or 'BGR'")
    mean, std = input_normalization(graph, float(cfg.onnx_input_mean), float(cfg.onnx_input_std))
    batchnorm = str(cfg.onnx_batchnorm)
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(
            f"config.model.onnx_batchnorm={batchnorm!r} is not one of {BATCHNORM_MODES}"
        )
    if batchnorm != "off" and int(cfg.onnx_batchnorm_images) < 1:
        raise ValueError(
            f"config.model.onnx_batchnorm_images={cfg.onnx_batchnorm_images} must be >= 1 (the "
            f"HR images the inserted BatchNorms are calibrated on)"
        )
    adapters = _adapters(cfg, allowed=("pointwise",))
    heads = _heads(cfg)
    _check_onnx_heads(heads["heads"], graph, cfg)
    return OnnxModel(
        graph,
        input_mean=mean,
        input_std=std,
        channel_order=order,
        batchnorm=batchnorm,
        conv_algorithm=_conv_algorithm(cfg),
        **adapters,
        **heads,
    )


def _check_onnx_heads(heads: HeadSettings, graph, cfg: ml_collections.ConfigDict) -> None:
    """What of the recognizability heads an arbitrary graph can carry: the quality head on its
    output; its "patch" / "multiscale" inputs only where the image reaches the first
    convolution through affine preprocessing (`stem_nodes`); no perceptibility attention (it
    re-weights the feature map before the embedding head, which a graph does not name)."""
    if heads.perceptibility_attention:
        raise ValueError(
            f"config.model.perceptibility_attention=True: not available for "
            f"config.model.name='onnx' ({cfg.onnx_path}): the graph does not say which of its "
            "tensors is the feature map before the embedding head"
        )
    if heads.reads_patches:
        try:
            stem_nodes(graph)
        except ValueError as e:
            raise ValueError(
                f"config.model.quality_head_input={heads.quality_input!r} reads the response "
                f"of the model's first convolution, which {cfg.onnx_path} does not offer ({e}); "
                "use 'embedding'"
            ) from None


def onnx_model_config(path: str, **fields) -> ml_collections.ConfigDict:
    """The config.model of an ONNX file as it is (sizes read from the graph)."""
    graph = load_graph(path)
    if not graph.output_dim:
        raise ValueError(f"{path}: the output's embedding size is not static in the graph")
    from facemoe_jax.core import defaults

    # Every model field at its default (no adapters, no heads), so any builder option reads.
    cfg = defaults.get_base_config().model
    cfg.update(
        name="onnx",
        onnx_path=os.path.abspath(path),
        image_size=graph.image_size,
        embed_dim=graph.output_dim,
        onnx_input_mean=-1.0,
        onnx_input_std=-1.0,
        onnx_channel_order="RGB",
        dtype="float32",
    )
    cfg.update(fields)
    return cfg


# ------------------------------------------------------------------------------------------------
# The table

_TRANSFORMER_HEADS = ("feature_bn1", "feature_bn2")  # the BatchNorms of the ViT and Swin heads


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the package needs to know about one `config.model.name`.

    build: config.model -> Flax module (validates first; errors name the field).
    head_names: Flax head module -> its PyTorch module name (the rest maps by rule).
    torch_twin: "module:function", config.model -> the PyTorch twin (nn.Module); None = none.
    torch_class: the twin's class as a PyTorch user imports it (the export's config.json).
    indexed_names: arcface_torch CNN naming: every Flax module `x_3` is PyTorch's `x.3`, and
      every BatchNorm carries a `num_batches_tracked` counter.
    head_batchnorms: Flax head BatchNorms whose PyTorch twins carry `num_batches_tracked`.
    window_buffers: Swin: PyTorch keeps `relative_position_index` and the shifted windows'
      `attn_mask` as buffers; we compute them from the config.
    constant_ones: PyTorch parameters frozen at ones (embed_dim,) that we build as constants.
    official_constructor: the official repository's constructor, formatted with config.model.
    export: "twin" (state_dict of the twin, and ONNX traced through it) or "graph" (the
      imported ONNX graph written back with the trained weights).
    """

    name: str
    build: Callable[[ml_collections.ConfigDict], object]
    head_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    torch_twin: str | None = None
    torch_class: str | None = None
    indexed_names: bool = False
    head_batchnorms: tuple[str, ...] = ()
    window_buffers: bool = False
    constant_ones: tuple[str, ...] = ()
    official_constructor: str | None = None
    export: str = "twin"

    @property
    def carries_weights(self) -> bool:
        """The architecture is a file that also holds trained weights (an imported ONNX graph):
        its initial variables are the file's, not random."""
        return self.export == "graph"

    def twin(self) -> Callable:
        """The PyTorch twin's factory (imports torch); errors when the model has none."""
        if self.torch_twin is None:
            raise ValueError(f"config.model.name={self.name!r} has no PyTorch export")
        module, _, function = self.torch_twin.partition(":")
        return getattr(importlib.import_module(module), function)


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


register(
    ModelSpec(
        name="vit_moe",
        build=build_vit,
        head_names={
            "patch_embed": "patch_embed.proj",
            "feature_fc1": "feature.0",
            "feature_bn1": "feature.1",
            "feature_fc2": "feature.2",
            "feature_bn2": "feature.3",
        },
        torch_twin="facemoe_jax.interop.torch_models:vit_twin",
        torch_class="facemoe_jax.interop.torch_models.ViTMoETorch",
        head_batchnorms=_TRANSFORMER_HEADS,
    )
)
register(
    ModelSpec(
        name="swin_moe",
        build=build_swin,
        head_names={
            "patch_embed": "patch_embed.proj",
            "patch_norm": "patch_embed.norm",
            "feature_bn1": "feature_layer.0",
            "feature_fc": "feature_layer.2",
            "feature_bn2": "feature_layer.3",
        },
        torch_twin="facemoe_jax.interop.torch_models:swin_twin",
        torch_class="facemoe_jax.interop.torch_models.SwinMoETorch",
        head_batchnorms=_TRANSFORMER_HEADS,
        window_buffers=True,
        official_constructor=(
            "backbones.swin_moe.swin_120_topk_moe_loss(num_experts={num_experts}, k={top_k})"
        ),
    )
)
register(
    ModelSpec(
        name="iresnet",
        build=build_iresnet,
        torch_twin="facemoe_jax.interop.torch_cnn:iresnet_twin",
        torch_class="facemoe_jax.interop.torch_cnn.IResNetTorch",
        indexed_names=True,
        constant_ones=("features.weight",),
    )
)
register(
    ModelSpec(
        name="mobilefacenet",
        build=build_mobilefacenet,
        torch_twin="facemoe_jax.interop.torch_cnn:mobilefacenet_twin",
        torch_class="facemoe_jax.interop.torch_cnn.MobileFaceNetTorch",
        indexed_names=True,
    )
)
register(ModelSpec(name="onnx", build=build_onnx, export="graph"))


def spec(name: str) -> ModelSpec:
    """The spec of config.model.name; an unknown name is an error listing the known ones."""
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model (known: "
            f"{', '.join(map(repr, MODELS))})"
        )
    return MODELS[name]


def build_model(cfg: ml_collections.ConfigDict):
    """Validates config.model and builds the encoder; errors name the offending field."""
    return spec(cfg.name).build(cfg)
