"""SmoothQuant-style migration of activation outliers into the weights, from streamed channel statistics.

A dynamically quantized MatMul quantizes its input with one scale per tensor, so a few outlier
channels (after LayerNorm, or GELU's large outputs in a transformer) set a coarse step for all the
others. Dividing input channel j by ``s_j`` and multiplying weight row j by ``s_j`` leaves the
product unchanged and moves the outliers into the per-output-column weight scales, where they
cost less. ``s_j = a_j^alpha / w_j^(1-alpha)`` (``a_j``: the channel's largest magnitude seen in
calibration, ``w_j``: the weight row's). ``alpha`` is chosen per tensor by an error estimate from
the same statistics (uniform rounding noise of both operands, propagated through the weights),
and migration is applied only where the estimate drops clearly.

The division by ``s`` is folded into the gamma and beta of a LayerNormalization producing the input
when nothing else reads it, so it costs nothing at run time. Elsewhere it needs an explicit Mul.
"""

from __future__ import annotations

import numpy as np
import onnx

from .calibration import TensorStats
from .graph import GraphIndex, WeightStore

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_GAIN = 0.8  # migrate only when the estimated error falls below this fraction of the unmigrated one


def estimated_error(stats: TensorStats, weights: list[np.ndarray], s: np.ndarray, weight_qmax: int) -> float:
    """Expected squared output error of uint8 per-tensor input and per-column int8 weights, summed over
    ``weights`` (each [K, N], rows scaled by ``s``; the input divided by ``s``)."""
    low = min(float(np.min(stats.channel_min / s)), 0.0)
    high = max(float(np.max(stats.channel_max / s)), 0.0)
    input_step = (high - low) / 255.0
    mean_square = np.sum(stats.channel_mean_square / s**2)
    total = 0.0
    for w in weights:
        scaled = w * s[:, None]
        column_step = np.abs(scaled).max(axis=0) / weight_qmax
        total += input_step**2 / 12.0 * float(np.sum(scaled**2)) + float(np.sum(column_step**2)) / 12.0 * mean_square
    return total


def smoothing_scale(stats: TensorStats, weights: list[np.ndarray], weight_qmax: int,
                    alpha: float = 0.0) -> tuple[np.ndarray | None, float, float]:
    """(per-channel ``s`` or None when migration does not pay, alpha used, estimated error ratio).

    ``alpha`` > 0 fixes it; 0 picks the best of :data:`ALPHAS` by :func:`estimated_error`.
    """
    if stats.channel_min is None or stats.channel_mean_square is None:
        return None, 0.0, 1.0
    magnitude = np.maximum(np.abs(stats.channel_min), np.abs(stats.channel_max))
    row_magnitude = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    usable = (magnitude > 0) & (row_magnitude > 0)
    base = estimated_error(stats, weights, np.ones_like(magnitude), weight_qmax)
    if base <= 0 or not usable.any():
        return None, 0.0, 1.0
    best: tuple[np.ndarray | None, float, float] = (None, 0.0, 1.0)
    for a in (alpha,) if alpha > 0 else ALPHAS:
        s = np.where(usable, magnitude**a / np.where(usable, row_magnitude, 1.0) ** (1 - a), 1.0)
        s = s / np.exp(np.mean(np.log(s)))  # scale-free: keeps values near their float range
        ratio = estimated_error(stats, weights, s, weight_qmax) / base
        if ratio < best[2]:
            best = (s, a, ratio)
    return best if best[2] < MIN_GAIN else (None, best[1], best[2])


def fold_inverse_scale(tensor: str, inverse: np.ndarray, index: GraphIndex, store: WeightStore, make_name) -> bool:
    """Multiply ``tensor`` by ``inverse`` along its last axis by rewriting the gamma and beta of the
    LayerNormalization producing it (through Reshapes that keep the last axis); False when it has no such
    producer (the caller's consumers must be the tensor's only readers). Constants inside fused patterns
    (tanh-GELU's 0.5) are left alone: a per-channel vector there stops onnxruntime's FastGelu fusion,
    which costs more than a Mul."""
    node = index.producer_node(tensor)
    while node is not None and node.op_type == "Reshape" and _keeps_last_axis(node, len(inverse), store) and len(
            index.consumers.get(node.input[0], ())) == 1 and not index.is_graph_output(node.input[0]):
        node = index.producer_node(node.input[0])  # a Reshape that keeps the channel axis last commutes with 1/s
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type != "LayerNormalization":
        return False
    return _fold_layernorm(node, inverse, index, store, make_name)


def _keeps_last_axis(node: onnx.NodeProto, channels: int, store: WeightStore) -> bool:
    """A Reshape to a constant shape ending in ``channels`` (its input ends in them too, or the product
    would not be defined for the consumer's K)."""
    shape = store.array(node.input[1]) if node.input[1] in store else None
    return shape is not None and shape.ndim == 1 and shape.size > 0 and int(shape[-1]) == channels


def _fold_layernorm(node: onnx.NodeProto, inverse: np.ndarray, index: GraphIndex, store: WeightStore,
                    make_name) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    gamma = store.array(node.input[1]) if node.input[1] in store else None
    if axis != -1 or gamma is None or gamma.shape != inverse.shape:
        return False
    has_beta = len(node.input) > 2 and bool(node.input[2])
    if has_beta and (node.input[2] not in store or store.array(node.input[2]).shape != inverse.shape):
        return False
    _scale_operand(node, 1, inverse, index, store, make_name)
    if has_beta:
        _scale_operand(node, 2, inverse, index, store, make_name)
    return True


def _scale_operand(node: onnx.NodeProto, k: int, inverse: np.ndarray, index: GraphIndex, store: WeightStore,
                   make_name) -> None:
    """Constant operand ``k`` of ``node`` times ``inverse`` (in place when only this node reads it)."""
    value = store.array(node.input[k])
    scaled = (value * inverse).astype(value.dtype)
    if len(index.consumers.get(node.input[k], ())) == 1 and not index.is_graph_output(node.input[k]):
        store.set_array(node.input[k], scaled)
    else:
        fresh = make_name(f"{node.input[k]}_smoothed")
        store.add_initializer(fresh, scaled)
        node.input[k] = fresh
