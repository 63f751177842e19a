"""Any ONNX face model as a Flax module: a small interpreter over `jax.lax`.

`read_graph(path)` parses the file once into an `OnnxGraph` (pure Python and numpy: nodes, their
attributes, and the initializers split into three kinds), and `OnnxModel(graph)` runs the nodes
in order under `jit`:

  parameters   float initializers in a weight slot (Conv/Gemm/MatMul weights and biases, PRelu
               slopes, BatchNorm scale and shift) or non-scalar operands of Add/Sub/Mul/Div:
               the module's `params`, initialised to the file's values, so they train, shard by
               the usual regex rules and export back under their ONNX names
  statistics   BatchNorm means and variances: `batch_stats`, updated in training with the
               node's momentum (ONNX: running * momentum + batch * (1 - momentum))
  constants    everything else (scalar preprocessing constants such as insightface's Sub 127.5
               and Mul 1/127.5, Clip bounds, Reshape shapes): static numpy values

Shape arithmetic (Shape, Gather, Concat, Unsqueeze ... feeding a Reshape) stays in numpy, so it
is resolved while tracing. A graph exported with its batch fixed at 1 runs at any batch: a
Reshape whose target starts with the graph's fixed batch size takes the actual batch there.

The module takes our images, NHWC in [-1, 1] (`(x / 255 - 0.5) / 0.5`), maps them back to
pixels and applies the graph's input normalisation `(pixel - input_mean) / input_std` in the
graph's channel order, NCHW. Graphs that normalise inside (their input feeds a Sub, Mul or Div
first: insightface's) take raw pixels: `input_normalization` resolves the default. Dropout is
the identity (inference), also in training.

Operators whose output shape depends on the data (NonZero, TopK with a data-dependent k, ...)
cannot be traced at a static shape: they are refused with the other unsupported operators,
before anything runs, naming the operator and the node.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.models.lora import LoRASettings, adapter_initializers
from facemoe_jax.models.onnx_ops import OPS, OnnxImportError, Context
from facemoe_jax.models.quality import QualitySettings
from facemoe_jax.models.recognizability import HeadSettings, estimate_quality, patch_statistics

Array = jax.Array

# Inputs (by position) of these operators that hold learnt weights.
WEIGHT_SLOTS = {
    "Conv": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "PRelu": (1,),
    "BatchNormalization": (1, 2),
}
STATISTIC_SLOTS = {"BatchNormalization": (3, 4)}
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
# Insightface's ArcFaceONNX default for graphs that do not normalise inside.
DEFAULT_MEAN, DEFAULT_STD = 127.5, 127.5
# config.model.onnx_batchnorm: "every_conv" inserts a BatchNorm after every Conv (OnnxModel).
BATCHNORM_MODES = ("off", "every_conv")
BATCHNORM_EPSILON = 1e-5  # PyTorch's BatchNorm2d default, the layers the export folded away


@dataclasses.dataclass(frozen=True)
class Node:
    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict


@dataclasses.dataclass(eq=False)
class OnnxGraph:
    """A parsed graph. Compared by identity (a Flax module field; one parse per file)."""

    path: str
    nodes: tuple[Node, ...]
    params: dict[str, np.ndarray]  # ONNX initializer name -> value
    statistics: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]
    input_name: str
    input_shape: tuple  # (batch or None, 3, H, W)
    output_name: str
    output_dim: int
    normalizes_inside: bool  # the input feeds a Sub/Mul/Div first (insightface)
    metadata: dict[str, str]

    def __hash__(self):
        return id(self)

    @property
    def image_size(self) -> int:
        return int(self.input_shape[2])

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0]

    @functools.cached_property
    def flax_names(self) -> dict[str, str]:
        """ONNX initializer name -> the module's variable name (params and statistics)."""
        return _flax_names(tuple(self.params) + tuple(self.statistics))


def _flax_names(onnx_names: tuple[str, ...]) -> dict[str, str]:
    """ONNX names ("layer1.0.conv1.weight", "onnx::Conv_519") -> unique identifier-like names:
    "/" would split a parameter path and "." reads as attribute access in sharding regexes."""
    out, taken = {}, set()
    for name in onnx_names:
        base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
        candidate, k = base, 1
        while candidate in taken:
            candidate, k = f"{base}_{k}", k + 1
        taken.add(candidate)
        out[name] = candidate
    return out


# ---- reading a file


def _attributes(node) -> dict:
    from onnx import helper, numpy_helper

    attrs = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif a.type == a.TENSOR:
            value = numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = tuple(v.decode() if isinstance(v, bytes) else v for v in value)
        attrs[a.name] = value
    return attrs


def _static_dim(dim) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def read_graph(path: str) -> OnnxGraph:
    """Parses `path`; raises OnnxImportError naming the file (and the node, for an operator)."""
    import onnx
    from onnx import numpy_helper

    if not os.path.isfile(path):
        raise OnnxImportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise OnnxImportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})")
    graph = model.graph
    if not graph.node:
        raise OnnxImportError(f"{path}: not a readable ONNX model (its graph has no nodes)")
    nodes = tuple(
        Node(n.op_type, n.name or f"#{i}", tuple(n.input), tuple(n.output), _attributes(n))
        for i, n in enumerate(graph.node)
    )
    for i, node in enumerate(nodes):
        if node.op not in OPS:
            raise OnnxImportError(
                f"{path}: operator {node.op!r} (node {node.name!r}, #{i}) is not supported by "
                f"the ONNX import; supported: {', '.join(sorted(OPS))}"
            )
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = _untie_initializers(nodes, initializers)
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise OnnxImportError(
            f"{path}: a face model takes one image input and gives an embedding; this graph "
            f"has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        )
    shape = tuple(_static_dim(d) for d in inputs[0].type.tensor_type.shape.dim)
    if len(shape) != 4 or shape[1] != 3 or shape[2] is None or shape[2] != shape[3]:
        raise OnnxImportError(
            f"{path}: input {inputs[0].name!r} has shape {shape}; expected (batch, 3, S, S) "
            "images, NCHW"
        )
    out_shape = [_static_dim(d) for d in graph.output[0].type.tensor_type.shape.dim]
    params, statistics, constants = _split_initializers(nodes, initializers)
    first_use = next((n for n in nodes if inputs[0].name in n.inputs), None)
    return OnnxGraph(
        path=os.path.abspath(path),
        nodes=nodes,
        params=params,
        statistics=statistics,
        constants=constants,
        input_name=inputs[0].name,
        input_shape=shape,
        output_name=graph.output[0].name,
        output_dim=int(out_shape[1]) if len(out_shape) > 1 and out_shape[1] else 0,
        normalizes_inside=first_use is not None and first_use.op in ("Sub", "Mul", "Div"),
        metadata={p.key: p.value for p in model.metadata_props},
    )


def _untie_initializers(nodes, initializers) -> tuple[Node, ...]:
    """PyTorch's exporter keeps one copy of initializers with equal values and names the others
    through Identity nodes (a fresh model's BatchNorm scales are all ones): those become
    initializers of their own again, so each layer keeps its own trainable weight and name."""
    kept = []
    for node in nodes:
        if node.op == "Identity" and node.inputs[0] in initializers:
            initializers[node.outputs[0]] = initializers[node.inputs[0]].copy()
        else:
            kept.append(node)
    return tuple(kept)


_GRAPHS: dict[tuple, OnnxGraph] = {}


def load_graph(path: str) -> OnnxGraph:
    """`read_graph`, parsed once per file version (models are built several times a run)."""
    path = os.path.abspath(path)
    stat = os.stat(path) if os.path.isfile(path) else None
    key = (path, stat and stat.st_mtime_ns, stat and stat.st_size)
    if key not in _GRAPHS:
        _GRAPHS[key] = read_graph(path)
    return _GRAPHS[key]


# Operators that only re-view a tensor: a weight reaches its slot through them in some exports
# (PyTorch's PRelu slope through Unsqueeze, shared weights through Identity).
VIEW_OPS = ("Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Cast")


def _split_initializers(nodes, initializers):
    producer = {out: node for node in nodes for out in node.outputs}

    def source(name):
        while name not in initializers and name in producer and producer[name].op in VIEW_OPS:
            name = producer[name].inputs[0]
        return name if name in initializers else None

    params, statistics = {}, {}
    for node in nodes:
        for slots, kind in ((WEIGHT_SLOTS, params), (STATISTIC_SLOTS, statistics)):
            for slot in slots.get(node.op, ()):
                name = source(node.inputs[slot]) if slot < len(node.inputs) else None
                if name is not None and initializers[name].dtype.kind == "f":
                    kind[name] = initializers[name]
        if node.op in ELEMENTWISE:
            for name in map(source, node.inputs):
                value = initializers.get(name)
                if value is not None and value.dtype.kind == "f" and value.size > 1:
                    params[name] = value
    constants = {k: v for k, v in initializers.items() if k not in params and k not in statistics}
    return params, statistics, constants


def input_normalization(graph: OnnxGraph, mean: float = -1.0, std: float = -1.0):
    """(mean, std) in pixel units that the graph's input expects; negative = the default: our
    own exports say (x / 255 - 0.5) / 0.5 in their metadata, graphs that normalise inside take
    raw pixels (0, 1), others insightface's (127.5, 127.5)."""
    if mean < 0 or std <= 0:
        if graph.metadata.get("producer") == "facemoe_jax":
            default = (DEFAULT_MEAN, DEFAULT_STD)
        elif graph.normalizes_inside:
            default = (0.0, 1.0)
        else:
            default = (DEFAULT_MEAN, DEFAULT_STD)
        mean = default[0] if mean < 0 else mean
        std = default[1] if std <= 0 else std
    return float(mean), float(std)


def adapted_nodes(graph: OnnxGraph) -> dict[str, Node]:
    """{weight initializer: node} of the convolutions LoRA adapts (`lora.where="pointwise"`):
    1x1, one group, stride 1, no padding, a learnt weight. In a mobile network these hold most
    parameters and the embedding head (MobileFaceNet's final 512x512 linear conv)."""
    out = {}
    for node in graph.nodes:
        if node.op != "Conv" or node.inputs[1] not in graph.params:
            continue
        w = graph.params[node.inputs[1]]
        plain = int(node.attrs.get("group", 1)) == 1 and not any(node.attrs.get("pads", ()))
        plain = plain and all(int(v) == 1 for v in node.attrs.get("strides", (1,)))
        if w.ndim >= 3 and all(k == 1 for k in w.shape[2:]) and plain:
            out[node.inputs[1]] = node
    return out


def stem_nodes(graph: OnnxGraph) -> tuple[Node, ...]:
    """The nodes from the image input to its first convolution, that convolution last.

    The quality head's "patch" and "multiscale" inputs (models/recognizability.py) read the
    response of an encoder's first linear layer; in a graph that is its first Conv, provided
    the image reaches it through affine preprocessing only (Add/Sub/Mul/Div with a constant:
    insightface's (x - 127.5) / 127.5, or none). Then the response is linear in the image up to
    a constant, which the "multiscale" detail ratios need (`multiscale_statistics` takes the
    constant off as the response to a zero image). Raises ValueError naming the node that
    stands in the way."""
    image, constant = {graph.input_name}, set(graph.constants) | set(graph.params)
    stem = []
    for node in graph.nodes:
        if node.op == "Constant":
            constant.update(node.outputs)
        elif node.op == "Conv" and node.inputs[0] in image:
            return tuple(stem + [node])
        else:
            operands = [name in image for name in node.inputs]
            affine = (
                node.op in ELEMENTWISE
                and sum(operands) == 1
                and all(f or name in constant for f, name in zip(operands, node.inputs))
                and not (node.op == "Div" and not operands[0])  # c / x is not affine
            )
            if not affine:
                raise ValueError(
                    f"{graph.path}: node {node.name!r} ({node.op}) comes before the first "
                    "convolution of the image, and is not an affine preprocessing step"
                )
            image.update(node.outputs)
        stem.append(node)
    raise ValueError(f"{graph.path}: the image reaches no convolution")


def batchnorm_name(node: Node) -> str:
    """The module name of the BatchNorm inserted after `node` ("bn_" and its output's name:
    output names are unique in a graph)."""
    return "bn_" + re.sub(r"[^0-9A-Za-z_]", "_", node.outputs[0])


def inserted_batchnorm_names(graph: OnnxGraph) -> tuple[str, ...]:
    """The module names of the BatchNorms `OnnxModel(batchnorm="every_conv")` inserts."""
    return tuple(batchnorm_name(node) for node in graph.nodes if node.op == "Conv")


class OnnxModel(nn.Module):
    """images (B, S, S, 3) in [-1, 1] -> ((B, D) float32 graph output, {}).

    `lora` adds adapters to the pointwise convolutions (`adapted_nodes`): y = W x + s B A x,
    or PETALface's quality-mixed pair (1 - a) s B1 A1 x + a s B2 A2 x with the per-image
    `quality` a (models/lora.py; dropout on the adapter output in training).

    `heads.quality_head` adds the recognizability quality head on the graph's output (sown as
    intermediates "quality"; the embedding itself is unchanged), reading the response of the
    graph's first convolution (`stem_nodes`) for its "patch" / "multiscale" inputs. The
    perceptibility attention needs the feature map before the embedding head, which an
    arbitrary graph does not name: build_onnx refuses it.

    `batchnorm="every_conv"` inserts an nn.BatchNorm after every Conv (after its adapter), for
    test-time BatchNorm adaptation of graphs exported with their BatchNorms folded into the
    convolutions (MobileFaceNet had one after each of them); see `_inserted_batchnorm`."""

    graph: OnnxGraph
    input_mean: float = DEFAULT_MEAN
    input_std: float = DEFAULT_STD
    channel_order: str = "RGB"
    lora: LoRASettings | None = None
    quality: QualitySettings = QualitySettings()
    heads: HeadSettings = HeadSettings()  # the quality head (off)
    batchnorm: str = "off"  # BATCHNORM_MODES: "every_conv" inserts the BatchNorms below
    conv_algorithm: str = "winograd"  # evaluation-mode 3x3 convolutions (kernels/winograd.py)

    def _inserted_batchnorm(self, node: Node, x: Array) -> Array:
        """The BatchNorm after convolution `node` (x: its output, NCHW), for test-time
        adaptation (train/adapt_bn.py) of a graph whose BatchNorms were folded into its
        convolutions. It always normalises with its stored statistics, also in training: they
        are set by calibration (train/calibrate_bn.py: mean mu and variance var of x on HR
        images, scale sqrt(var + eps), bias mu, so the layer is the identity there) and by
        the adaptation, never by a training step. Its initial values (0, 1, sqrt(1 + eps),
        0) make it the identity too, so an uncalibrated model is the plain graph."""
        return nn.BatchNorm(
            use_running_average=True,
            axis=1,
            epsilon=BATCHNORM_EPSILON,
            scale_init=nn.initializers.constant(float(np.sqrt(1.0 + BATCHNORM_EPSILON))),
            name=batchnorm_name(node),
        )(x)

    def _adapter(self, weight_name: str, x: Array, quality, train: bool) -> Array:
        lora, w = self.lora, self.graph.params[weight_name]
        down_init, up_init = adapter_initializers(lora.init, lora.rank)
        base = self.graph.flax_names[weight_name]
        pairs = [("", None)] if not lora.quality_mix else [("", 1.0 - quality), ("2", quality)]
        out = 0.0
        for suffix, mix in pairs:
            down = self.param(f"{base}_lora_down{suffix}", down_init, (w.shape[1], lora.rank))
            up = self.param(f"{base}_lora_up{suffix}", up_init, (lora.rank, w.shape[0]))
            h = jnp.einsum("nc...,cr->nr...", x, down)
            h = jnp.einsum("nr...,ro->no...", h, up)
            h = nn.Dropout(lora.dropout, deterministic=not train)(h)
            if mix is not None:
                h = h * mix.reshape((-1,) + (1,) * (h.ndim - 1))
            out = out + lora.scale * h
        return out

    @nn.compact
    def __call__(self, x: Array, train: bool = False, quality: Array | None = None):
        graph = self.graph
        if x.shape[1:3] != (graph.image_size, graph.image_size):
            raise ValueError(
                f"{graph.path} takes {graph.image_size}x{graph.image_size} images; got "
                f"{x.shape[1]}x{x.shape[2]}"
            )
        names = graph.flax_names
        values: dict[str, Any] = dict(graph.constants)
        for name, value in graph.params.items():
            values[name] = self.param(names[name], lambda _, v=value: jnp.asarray(v))
        statistics = {
            name: self.variable("batch_stats", names[name], lambda v=value: jnp.asarray(v))
            for name, value in graph.statistics.items()
        }
        for name, variable in statistics.items():
            values[name] = variable.value
        context = Context(
            train, graph.fixed_batch, statistics, self.is_initializing(), self.conv_algorithm
        )
        values[graph.input_name] = self._graph_input(x)
        values[""] = None  # an omitted optional input
        adapted = adapted_nodes(graph) if self.lora is not None else {}
        quality = self.quality.resolve(x, quality, self.lora)
        for node in graph.nodes:
            outputs = OPS[node.op](context, node, [values[name] for name in node.inputs])
            if node.op == "Conv" and node.inputs[1] in adapted:
                adapter = self._adapter(node.inputs[1], values[node.inputs[0]], quality, train)
                outputs = (outputs[0] + adapter,)
            if node.op == "Conv" and self.batchnorm == "every_conv":
                outputs = (self._inserted_batchnorm(node, outputs[0]),)
            values.update(zip(node.outputs, outputs))
        out = values[graph.output_name]
        out = out.reshape(out.shape[0], -1).astype(jnp.float32)
        if self.heads.quality_head:
            patch = None
            if self.heads.reads_patches:
                stem = stem_nodes(graph)
                tokens = jnp.transpose(values[stem[-1].outputs[0]], (0, 2, 3, 1))
                embed = functools.partial(self._stem_response, stem, values)
                patch = patch_statistics(self.heads, self, tokens, embed, x)
            estimate_quality(self.heads, self, out, train, patch)
        return out, {}

    def _graph_input(self, x: Array) -> Array:
        """Our images (B, S, S, 3) in [-1, 1] -> the graph's input, normalised, NCHW."""
        pixels = (x.astype(jnp.float32) * 0.5 + 0.5) * 255.0
        if self.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        return jnp.transpose((pixels - self.input_mean) / self.input_std, (0, 3, 1, 2))

    def _stem_response(self, stem, values: dict, x: Array) -> Array:
        """The first convolution's response (B, H', W', C) to images x in [-1, 1], run again
        on other images (the detail x - U_k(x)) with the same weights and constants."""
        local = {**values, self.graph.input_name: self._graph_input(x)}
        context = Context(
            False, self.graph.fixed_batch, {}, self.is_initializing(), self.conv_algorithm
        )
        for node in stem:
            outputs = OPS[node.op](context, node, [local[name] for name in node.inputs])
            local.update(zip(node.outputs, outputs))
        return jnp.transpose(local[stem[-1].outputs[0]], (0, 2, 3, 1))


def onnx_variables(graph: OnnxGraph) -> dict:
    """{"params", "batch_stats"}: the file's own values under the module's names."""
    names = graph.flax_names
    return {
        "params": {names[k]: np.asarray(v) for k, v in graph.params.items()},
        "batch_stats": {names[k]: np.asarray(v) for k, v in graph.statistics.items()},
    }


def onnx_state_dict(
    graph: OnnxGraph, variables: dict, lora: LoRASettings | None = None
) -> dict[str, np.ndarray]:
    """{ONNX initializer name: value} of `variables` (the inverse of `onnx_variables`), in the
    file's dtypes: what an export writes back into the graph. Plain LoRA adapters are merged
    into their convolution (W + s (A B)^T: the same function, the graph unchanged); a
    quality-mixed pair depends on each image's `a` and cannot be, so it is refused."""
    names = graph.flax_names
    params = variables["params"]
    out = {}
    for collection, source in (("params", graph.params), ("batch_stats", graph.statistics)):
        for name, original in source.items():
            out[name] = np.asarray(variables[collection][names[name]]).astype(original.dtype)
    inserted = [k for k in inserted_batchnorm_names(graph) if k in params]
    if inserted:
        raise ValueError(
            f"the ONNX export writes the graph's own initializers; this model has BatchNorms "
            f"inserted for test-time adaptation ({inserted[0]}, ...: config.model."
            f"onnx_batchnorm), which are not part of the graph: export it with 'off'"
        )
    adapters = [k for k in params if "_lora_" in k and k not in set(names.values())]
    if not adapters:
        return out
    if lora is None or lora.quality_mix:
        raise ValueError(
            f"the ONNX export writes the graph's own initializers; this model has "
            f"{'quality-mixed ' if lora is not None else ''}adapters ({adapters[0]}, ...), which "
            f"depend on each image's quality and cannot be merged into them"
        )
    for weight in adapted_nodes(graph):
        base = names[weight]
        down, up = np.asarray(params[f"{base}_lora_down"]), np.asarray(params[f"{base}_lora_up"])
        delta = (lora.scale * (down @ up)).T  # (out, in)
        shape = out[weight].shape
        out[weight] = (out[weight].astype(np.float64) + delta.reshape(shape)).astype(
            out[weight].dtype
        )
    return out
