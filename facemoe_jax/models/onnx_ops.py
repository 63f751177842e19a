"""The ONNX operators of `models/onnx_graph.py`: fn(context, node, inputs) -> outputs.

Inputs that are numpy values (constants, shapes) give numpy outputs, so shape arithmetic is
resolved while tracing; everything else is jax. Layouts are ONNX's (NCHW). Each operator follows
the ONNX operator documentation for the attributes it reads; an attribute we do not support
raises OnnxImportError naming the node.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np

from facemoe_jax.kernels import winograd

Array = jax.Array


class OnnxImportError(ValueError):
    """An ONNX file that cannot become a JAX model: unreadable, or an unsupported operator."""


@dataclasses.dataclass
class Context:
    """What an operator may need besides its inputs."""

    train: bool
    fixed_batch: int | None
    statistics: dict  # ONNX name -> flax Variable (batch_stats)
    initializing: bool
    conv_algorithm: str = "direct"  # "winograd": evaluation-mode 3x3 convolutions by F(2x2, 3x3)

    def update_statistic(self, name: str, batch_value: Array, momentum: float) -> None:
        variable = self.statistics[name]
        if not self.initializing:
            variable.value = momentum * variable.value + (1 - momentum) * batch_value


def _is_static(*values) -> bool:
    return all(isinstance(v, np.ndarray | np.generic | int | float) for v in values)


def _xp(*values):
    return np if _is_static(*values) else jnp


def _pairs(pads, spatial: int):
    pads = tuple(pads) if pads else (0,) * (2 * spatial)
    return [(int(pads[i]), int(pads[i + spatial])) for i in range(spatial)]


def _auto_pad(node, x_shape, kernel, strides, dilations):
    mode = node.attrs.get("auto_pad", "NOTSET")
    spatial = len(kernel)
    if mode in ("NOTSET", ""):
        return _pairs(node.attrs.get("pads"), spatial)
    if mode == "VALID":
        return [(0, 0)] * spatial
    pads = []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        low = total // 2 if mode == "SAME_UPPER" else total - total // 2
        pads.append((low, total - low))
    return pads


def _conv(context, node, inputs):
    x, w = inputs[0], inputs[1]
    spatial = w.ndim - 2
    strides = tuple(node.attrs.get("strides", (1,) * spatial))
    dilations = tuple(node.attrs.get("dilations", (1,) * spatial))
    padding = _auto_pad(node, x.shape, w.shape[2:], strides, dilations)
    groups = int(node.attrs.get("group", 1))
    if groups == 1 and all(k == 1 for k in w.shape[2:]) and _unit_window(strides, padding):
        y = _pointwise_conv(x, w)
    elif spatial == 2 and groups == x.shape[1] and w.shape[1] == 1:
        y = _depthwise_conv(x, w, strides, padding, dilations)
    elif _winograd_applies(context, x, w, strides, padding, dilations, groups):
        # kernels/winograd.py computes NHWC x HWIO; XLA:CPU lays its convolutions out so too.
        y = winograd.conv3x3(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0))
        y = y.transpose(0, 3, 1, 2)
    else:
        spec = ("NCH", "OIH", "NCH") if spatial == 1 else ("NCHW", "OIHW", "NCHW")
        y = jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=strides,
            padding=padding,
            rhs_dilation=dilations,
            dimension_numbers=spec,
            feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST,
        )
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + inputs[2].reshape((1, -1) + (1,) * spatial)
    return (y,)


def _winograd_applies(context, x, w, strides, padding, dilations, groups) -> bool:
    if context.conv_algorithm != "winograd" or context.train or x.ndim != 4:
        return False
    return winograd.applies(
        x.transpose(0, 2, 3, 1),
        w.transpose(2, 3, 1, 0),
        strides,
        padding,
        None,
        dilations,
        winograd.NHWC,
        groups,
    )


def _unit_window(strides, padding) -> bool:
    return all(s == 1 for s in strides) and all(p == (0, 0) for p in padding)


def _pointwise_conv(x, w):
    """A 1x1 conv as a matrix product over the channels. Why: XLA:CPU's convolution is slower
    than its dot (measured on MobileFaceNet's 56x56 64->128 layer, batch 64: 1.3x forward, 4.7x
    gradient), and 1x1 convolutions hold most of a mobile network's FLOPs."""
    return jnp.einsum(
        "nc...,oc->no...", x, w.reshape(w.shape[:2]), precision=jax.lax.Precision.HIGHEST
    )


def _depthwise_conv(x, w, strides, padding, dilations):
    """A depthwise conv as a sum over the kernel's taps of shifted, strided slices times a
    per-channel weight. Why: XLA:CPU runs grouped convolutions one group at a time (measured
    16x slower forward and 13x slower gradient than this on MobileFaceNet's 28x28x128 layer)."""
    multiplier = w.shape[0] // x.shape[1]
    if multiplier > 1:  # output channel o reads input channel o // multiplier
        x = jnp.repeat(x, multiplier, axis=1)
    x = jnp.pad(x, [(0, 0), (0, 0)] + list(padding))
    (kh, kw), (sh, sw), (dh, dw) = w.shape[2:], strides, dilations
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = 0.0
    for i in range(kh):
        for j in range(kw):
            window = x[
                :,
                :,
                i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
                j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
            ]
            y = y + window * w[:, 0, i, j][None, :, None, None]
    return y


def _batch_norm(context, node, inputs):
    x, scale, bias, mean, var = inputs
    eps = float(node.attrs.get("epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if context.train:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=axes)
        momentum = float(node.attrs.get("momentum", 0.9))
        context.update_statistic(node.inputs[3], mean, momentum)
        context.update_statistic(node.inputs[4], var, momentum)
    inv = scale / jnp.sqrt(var + eps)
    return (x * inv.reshape(shape) + (bias - mean * inv).reshape(shape),)


def _prelu(context, node, inputs):
    x, slope = inputs
    if slope.ndim == 1 and x.ndim > 2 and slope.shape[0] == x.shape[1] != 1:
        slope = slope.reshape((1, -1) + (1,) * (x.ndim - 2))  # per channel, as PyTorch exports
    return (jnp.where(x >= 0, x, x * slope),)


def _clip(context, node, inputs):
    low = node.attrs.get("min", -np.inf)
    high = node.attrs.get("max", np.inf)
    if len(inputs) > 1 and inputs[1] is not None:
        low = inputs[1]
    if len(inputs) > 2 and inputs[2] is not None:
        high = inputs[2]
    return (jnp.clip(inputs[0], low, high),)


def _elementwise(fn):
    """Python's operator on both kinds (numpy broadcasting is ONNX's); integer Div truncates."""

    def apply(context, node, inputs):
        a, b = inputs
        if _is_static(a, b):
            a, b = np.asarray(a), np.asarray(b)
            if fn is operator.truediv and a.dtype.kind in "iu" and b.dtype.kind in "iu":
                return (np.asarray(np.trunc(a / b), a.dtype),)
            return (np.asarray(fn(a, b)),)
        return (fn(a, b),)

    return apply


def _gemm(context, node, inputs):
    a, b = inputs[0], inputs[1]
    a = a.T if node.attrs.get("transA", 0) else a
    b = b.T if node.attrs.get("transB", 0) else b
    y = float(node.attrs.get("alpha", 1.0)) * jnp.matmul(a, b, precision="highest")
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(node.attrs.get("beta", 1.0)) * inputs[2]
    return (y,)


def _flatten(context, node, inputs):
    x = inputs[0]
    axis = int(node.attrs.get("axis", 1)) % max(x.ndim, 1)
    return (x.reshape((int(np.prod(x.shape[:axis])), -1)),)


def _reshape(context, node, inputs):
    x, target = inputs[0], [int(v) for v in np.asarray(inputs[1])]
    if not node.attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    fixed = context.fixed_batch
    actual = x.shape[0] if x.ndim else None
    if fixed is not None and actual != fixed and target and target[0] == fixed:
        # The exporter baked the traced batch into the shape: keep the batch axis as it is.
        target[0] = actual
    return (x.reshape(target),)


def _transpose(context, node, inputs):
    x = inputs[0]
    perm = node.attrs.get("perm", tuple(reversed(range(x.ndim))))
    return (_xp(x).transpose(x, perm),)


def _concat(context, node, inputs):
    return (_xp(*inputs).concatenate(inputs, axis=int(node.attrs["axis"])),)


def _pool_geometry(node, x):
    kernel = tuple(node.attrs["kernel_shape"])
    spatial = len(kernel)
    strides = tuple(node.attrs.get("strides", (1,) * spatial))
    dilations = tuple(node.attrs.get("dilations", (1,) * spatial))
    if any(d != 1 for d in dilations):
        raise OnnxImportError(f"{node.op} node {node.name!r}: dilations {dilations} unsupported")
    padding = _auto_pad(node, x.shape, kernel, strides, dilations)
    if node.attrs.get("ceil_mode", 0):  # extra padding at the end so the last window fits
        for i, (size, k, s) in enumerate(zip(x.shape[2:], kernel, strides)):
            low, high = padding[i]
            span = size + low + high - k
            extra = (-span) % s
            if extra and (span + extra) // s * s < size + low:  # a window must start inside
                padding[i] = (low, high + extra)
    return (1, 1) + kernel, (1, 1) + strides, [(0, 0), (0, 0)] + padding


def _max_pool(context, node, inputs):
    if len(node.outputs) > 1 and node.outputs[1]:
        raise OnnxImportError(f"MaxPool node {node.name!r}: the Indices output is unsupported")
    x = inputs[0]
    window, strides, padding = _pool_geometry(node, x)
    return (jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding),)


def _average_pool(context, node, inputs):
    x = inputs[0]
    window, strides, padding = _pool_geometry(node, x)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
    if node.attrs.get("count_include_pad", 0):
        # Pads count, the ceil_mode overhang does not: count ones over the explicit pads only.
        explicit = [(0, 0), (0, 0)] + _auto_pad(
            node, x.shape, window[2:], strides[2:], (1,) * (x.ndim - 2)
        )
        ones = jnp.pad(jnp.ones(x.shape[2:], x.dtype), explicit[2:], constant_values=1.0)
        rest = [(0, p[1] - e[1]) for p, e in zip(padding[2:], explicit[2:])]
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window[2:], strides[2:], rest)
    else:
        ones = jnp.ones(x.shape[2:], x.dtype)
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window[2:], strides[2:], padding[2:])
    return (total / count,)


def _global_average_pool(context, node, inputs):
    x = inputs[0]
    return (jnp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True),)


def _axes(node, inputs, index=1):
    if len(inputs) > index and inputs[index] is not None:
        return tuple(int(a) for a in np.asarray(inputs[index]))
    axes = node.attrs.get("axes")
    return None if axes is None else tuple(int(a) for a in axes)


def _reduce(fn):
    def apply(context, node, inputs):
        x = inputs[0]
        axes = _axes(node, inputs)
        if axes is None and node.attrs.get("noop_with_empty_axes", 0):
            return (x,)
        keep = bool(node.attrs.get("keepdims", 1))
        return (getattr(_xp(x), fn)(x, axis=axes, keepdims=keep),)

    return apply


def _constant(context, node, inputs):
    attrs = node.attrs
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            value = np.asarray(attrs[key])
            if key in ("value_float", "value_floats"):
                value = value.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                value = value.astype(np.int64)
            return (value,)
    raise OnnxImportError(f"Constant node {node.name!r}: no value attribute we read")


def _shape(context, node, inputs):
    shape = np.asarray(np.shape(inputs[0]), np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return (shape[start:end],)


def _gather(context, node, inputs):
    x, index = inputs
    return (_xp(x, index).take(x, np.asarray(index), axis=int(node.attrs.get("axis", 0))),)


def _unsqueeze(context, node, inputs):
    x, axes = inputs[0], _axes(node, inputs)
    rank = np.ndim(x) + len(axes)
    out = x
    for a in sorted(a % rank for a in axes):
        out = _xp(x).expand_dims(out, a)
    return (out,)


def _squeeze(context, node, inputs):
    x, axes = inputs[0], _axes(node, inputs)
    return (_xp(x).squeeze(x, axis=axes),)


_ONNX_DTYPES = {
    1: np.float32,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
}


def _cast(context, node, inputs):
    to = _ONNX_DTYPES.get(int(node.attrs["to"]))
    if to is None:
        raise OnnxImportError(
            f"Cast node {node.name!r}: target type {node.attrs['to']} unsupported"
        )
    x = inputs[0]
    if _is_static(x):
        return (np.asarray(x).astype(to),)
    # Traced values keep JAX's widths (float64 is float32 unless x64 is enabled).
    return (x.astype(jax.dtypes.canonicalize_dtype(to)),)


def _unary(fn):
    return lambda context, node, inputs: (fn(inputs[0]),)


OPS = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": _unary(jax.nn.relu),
    "Sigmoid": _unary(jax.nn.sigmoid),
    "Tanh": _unary(jnp.tanh),
    "LeakyRelu": lambda m, n, i: (jax.nn.leaky_relu(i[0], float(n.attrs.get("alpha", 0.01))),),
    "Softmax": lambda m, n, i: (jax.nn.softmax(i[0], axis=int(n.attrs.get("axis", -1))),),
    "Clip": _clip,
    "Add": _elementwise(operator.add),
    "Sub": _elementwise(operator.sub),
    "Mul": _elementwise(operator.mul),
    "Div": _elementwise(operator.truediv),
    "MatMul": lambda m, n, i: (jnp.matmul(i[0], i[1], precision="highest"),),
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "GlobalAveragePool": _global_average_pool,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "ReduceMean": _reduce("mean"),
    "Identity": lambda m, n, i: (i[0],),
    "Dropout": lambda m, n, i: (i[0], np.ones(np.shape(i[0]), bool)),
    "Constant": _constant,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": _cast,
}
