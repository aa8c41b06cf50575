"""Channel dependency groups: which output neurons / channels a rewrite may drop and what that touches.

Shared by zero-rows (removes the channels) and prune-neurons (zeroes the ones it would remove).

Every MatMul / Gemm / Conv output (a *source*) creates one variable per output channel. Values
derived channel by channel (bias adds, BatchNorm, activations, pools, depthwise Conv, residual Add,
SE-style Mul, Concat, Flatten/Reshape into a classifier, Transpose, ReduceSum over other axes)
carry those variables along; an element-wise op whose two operands both carry channels joins their
variables into one group. Along the way each value records which of its channels are constant and
their values (a source row of zeros gives its bias; the constant then flows through the per-channel
ops, so an activation of a bias is folded correctly).

Attention heads: a Reshape that splits the channel axis into (heads, head size) joins each head's
channels into one variable, so a head goes as a whole. The split value carries them through
Transpose, the scores MatMul (Q·Kᵀ contracts the head size and leaves one channel per head on the
batch axis), per-head Softmax / scale / mask, the context MatMul (softmax rows sum to one, so a
constant V head gives a constant context) and the Reshape that joins heads back, into the output
projection. Reshape targets that spell out the head count or the width are rewritten.

A variable is removed when (a) it reaches no value the analysis does not understand (graph
outputs, unknown consumers, grouped Conv, shared weights: those *pin* it, counted as
``skipped_<reason>``), (b) wherever it is contracted by a consumer MatMul / Gemm / Conv it
holds a constant the consumer can fold into its bias (any constant for Gemm / MatMul / unpadded
Conv, only zero for a padded Conv or a ReduceSum over the channels, as in hand-written layer
norms), and (c) a grouped Conv it enters or leaves loses equally many channels from every group.
Groups with a dead source row that must stay are counted per reason in ``kept`` (a group may have
several reasons: a pin, where its constant became input-dependent, a consumer that cannot fold it).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..graph import (STANDARD_DOMAINS, ConstantResolver, GraphIndex, NodeEvaluationError, WeightStore, evaluate_node,
                     node_subgraphs, walk_graphs)
from .weights import WeightUse, attribute, to_canonical, weight_use

# Ops that map each channel to itself, element by element (extra inputs must be constants).
CHANNELWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Neg", "Abs", "Exp",
    "Erf", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
}
CHANNELWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
# Ops that carry attention heads (a value whose channel axis is split into heads and head size).
HEAD_OPS = CHANNELWISE_UNARY | CHANNELWISE_BINARY | {"Transpose", "Reshape", "MatMul", "Softmax"}


@dataclass(eq=False)
class Channels:
    """A value carrying channels on ``axis`` (negative): the variable at each position and its constants."""

    ids: np.ndarray          # channel variable per position
    axis: int                # negative axis of the channel dimension
    rank: int | None         # the value's rank when known
    const: np.ndarray        # position holds an input-independent value
    value: np.ndarray        # that value (float64; 0 where not constant)
    inner: tuple[int, int] | None = None  # split into heads: (negative axis within a head, head size)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def heads(self) -> int:
        return self.size // self.inner[1]

    @property
    def head_ids(self) -> np.ndarray:
        """One variable per head (a head's channels are joined when it is split off)."""
        return self.ids.reshape(self.heads, -1)[:, 0]

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,) if self.inner is None else (self.axis, self.inner[0])

    @property
    def positive_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclass(eq=False)
class Producer:
    """A node whose weight rows create channels: a source (MatMul/Gemm/Conv) or a depthwise Conv."""

    node: onnx.NodeProto
    use: WeightUse
    output: str
    depthwise: bool = False


@dataclass(eq=False)
class ChannelGraph:
    """The channel dependency groups of one graph and what removing a channel must touch.

    With ``assume_dead`` every producer row (weights and bias) is taken as zero: the result then
    says which channels could be removed once zeroed (what prune-neurons needs).
    """

    graph: onnx.GraphProto
    opset: int
    shapes: dict[str, tuple] = field(default_factory=dict)
    assume_dead: bool = False
    exclude_nodes: frozenset[str] = frozenset()
    skips: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.store = WeightStore(self.graph)
        self.index = GraphIndex(self.graph)
        self.values: dict[str, Channels] = {}
        self.producers: list[Producer] = []
        self.exits: list[tuple[onnx.NodeProto, WeightUse]] = []
        self.sliced_constants: list[tuple[onnx.NodeProto, int, str, int]] = []  # node, input, channel value, axis
        # Reshape targets to rewrite: node, channel value, target entry, multiplier, divisor of the kept count
        self.reshapes: list[tuple[onnx.NodeProto, str, int, int, int]] = []
        self.zero_exits: list[tuple[str, str]] = []  # values summed over their channels (a channel goes only if 0)
        self.heads: list[np.ndarray] = []  # one variable per attention head, per split
        self.balanced: list[tuple[np.ndarray, int]] = []  # grouped Conv sides: channels, groups
        self.constants = ConstantResolver(self.index, self.store, self.opset)
        self._unions: list[tuple[np.ndarray, np.ndarray]] = []
        self._pins: list[tuple[np.ndarray, str]] = []
        self._lost: list[tuple[np.ndarray, str]] = []     # constant channels made input-dependent, and where
        self._sources: list[tuple[np.ndarray, np.ndarray]] = []  # source variables and which are dead
        self.kept: Counter = Counter()  # dead channels that must stay, per reason
        self._variables = 0
        for i in self.index.topological_order():
            self._visit(self.index.nodes[i], i)
        for name in self.index.output_names & self.values.keys():
            self._pin(name, "graph_output")
        self.roots = self._resolve()
        self.blocked = self._blocked()

    # ----------------------------------------------------------------------- constants

    def constant(self, name: str) -> np.ndarray | None:
        """A weight, or a small constant computed from weights (Reshape/Unsqueeze/... of constants)."""
        return self.constants.value(name)

    def readers(self, name: str) -> int:
        return len(self.index.consumers.get(name, ()))

    def _evaluate(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        """The node's first output on constant inputs (ONNX reference semantics); None if it cannot run."""
        try:
            return evaluate_node(node, feeds, self.opset)[0]
        except NodeEvaluationError:  # not a known constant
            return None

    # ----------------------------------------------------------------------- analysis

    def _fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self._variables, self._variables + n)
        self._variables += n
        return ids

    def _pin(self, name: str, reason: str) -> None:
        self._pins.append((self.values[name].ids, reason))
        self.skips[reason] += 1

    def _lose(self, data: Channels, const: np.ndarray, reason: str) -> None:
        """Record channels that were constant in ``data`` and are not any more (``const``)."""
        lost = data.const & ~const
        if lost.any():
            self._lost.append((data.ids[lost], reason))

    def _visit(self, node: onnx.NodeProto, position: int) -> None:
        carried = [n for n in dict.fromkeys(self.index.uses[position]) if n in self.values]
        use = weight_use(node, self.store)
        if next(node_subgraphs(node), None) is not None:
            for name in carried:
                self._pin(name, "used_in_subgraph")
            return
        heads = [n for n in carried if self.values[n].inner is not None]
        if heads and (use is not None or node.op_type not in HEAD_OPS or node.domain not in STANDARD_DOMAINS):
            self._pin_all(heads, f"heads_into_{node.op_type}")
            carried = [n for n in carried if n not in heads]
        if use is not None:
            self._pin_all([n for n in carried if n != use.data], f"consumer_{node.op_type}")
            self._visit_weighted(node, use, tracked=use.data in carried)
            return
        if not carried:
            return
        if node.domain not in STANDARD_DOMAINS:
            return self._pin_all(carried, f"consumer_{node.op_type}")
        op = node.op_type
        unused_extras = all(not self.readers(o) and o not in self.index.output_names for o in node.output[1:])
        if op in CHANNELWISE_UNARY and carried == [node.input[0]] and unused_extras:
            self._visit_unary(node)
        elif op in POOLS and carried == [node.input[0]] and unused_extras:
            self._visit_pool(node)
        elif op == "BatchNormalization" and carried == [node.input[0]] and unused_extras:
            self._visit_batchnorm(node)
        elif op in CHANNELWISE_BINARY and len(node.input) == 2:
            self._visit_binary(node, carried)
        elif op == "Concat":
            self._visit_concat(node, carried)
        elif op == "Reshape" and carried == [node.input[0]]:
            self._visit_reshape(node)
        elif op == "Flatten" and carried == [node.input[0]]:
            self._visit_flatten(node)
        elif op == "Transpose":
            self._visit_transpose(node)
        elif op == "Softmax" and unused_extras:
            self._visit_softmax(node)
        elif op == "MatMul" and len(node.input) == 2:
            self._visit_matmul(node, carried)
        elif op in ("ReduceSum", "ReduceMean") and carried == [node.input[0]]:
            self._visit_reduce(node)
        else:
            self._pin_all(carried, f"consumer_{op}")

    def _pin_all(self, names: list[str], reason: str) -> None:
        for name in names:
            self._pin(name, reason)

    def _visit_weighted(self, node: onnx.NodeProto, use: WeightUse, tracked: bool) -> None:
        weight = self.store.tensor(use.weight)
        rank = len(weight.dims)
        if node.op_type == "Conv" and use.groups == weight.dims[0] > 1 and weight.dims[1] == 1:
            if tracked and not self._excluded_or_shared(node, use, tracked):
                self._visit_depthwise(node, use, rank)
            return
        whole = self._excluded_or_shared(node, use, tracked)
        if tracked and not whole and self._check_exit(node, use, rank):
            self.exits.append((node, use))
            if use.groups > 1:
                self.balanced.append((self.values[use.data].ids, use.groups))
        out = node.output[0]
        if node.op_type == "Conv":
            axis, out_rank = -(rank - 1), rank
        else:
            axis, out_rank = -1, 2 if node.op_type == "Gemm" else self._rank(out)
        const, value = self._source_constants(node, use)
        self.values[out] = Channels(self._fresh(len(const)), axis, out_rank, const, value)
        self._sources.append((self.values[out].ids, const))
        self.producers.append(Producer(node, use, out))
        if use.groups > 1:
            self.balanced.append((self.values[out].ids, use.groups))
        if use.bias and self.constant(use.bias) is None:
            self._pin(out, "runtime_bias")
        elif whole:
            self._pin(out, self._whole_reason(node))

    def _excluded_or_shared(self, node: onnx.NodeProto, use: WeightUse, tracked: bool) -> bool:
        """Excluded producers and weights read by several nodes stay whole (slicing would copy them)."""
        whole = node.name in self.exclude_nodes or self.readers(use.weight) > 1 or (
            use.bias is not None and use.bias in self.store and self.readers(use.bias) > 1)
        if whole and tracked:
            self._pin(use.data, self._whole_reason(node))
        return whole

    def _whole_reason(self, node: onnx.NodeProto) -> str:
        return "excluded" if node.name in self.exclude_nodes else "shared_weight"

    def _check_exit(self, node: onnx.NodeProto, use: WeightUse, rank: int) -> bool:
        """A consumer contracts the channel axis of its data input, or the value is pinned."""
        data = self.values[use.data]
        if node.op_type == "Conv":
            ok = data.axis == -(rank - 1)
        elif node.op_type == "Gemm":
            ok = data.axis == -1 and use.data_axis == 1
        else:
            ok = data.axis == -1
        if not ok:
            self._pin(use.data, "channel_axis_not_contracted")
        return ok

    def _source_constants(self, node: onnx.NodeProto, use: WeightUse) -> tuple[np.ndarray, np.ndarray]:
        """Which output channels have all-zero weight rows, and their value (the scaled bias)."""
        if self.assume_dead:  # rows and bias taken as zero: the channel count is all it needs (no read)
            channels = self.store.tensor(use.weight).dims[use.out_axis]
            return np.ones(channels, bool), np.zeros(channels)
        canonical = to_canonical(self.store.array(use.weight), use)
        channels = canonical.shape[0]
        dead = ~canonical.reshape(channels, -1).any(axis=1)
        value = np.zeros(channels)
        bias = self.constant(use.bias) if use.bias else None
        if bias is not None:
            if node.op_type == "Gemm":
                beta = attribute(node, "beta", 1.0)
                per_row = np.broadcast_to(bias, (*bias.shape[:-1], channels)).reshape(-1, channels)
                varies = (per_row != per_row[:1]).any(axis=0)
                dead &= ~varies
                value = beta * per_row[0].astype(np.float64)
            else:
                value = bias.astype(np.float64)
        return dead, np.where(dead, value, 0.0)

    def _visit_depthwise(self, node: onnx.NodeProto, use: WeightUse, rank: int) -> None:
        """A depthwise Conv keeps channel j in channel j: a member of its input's group."""
        data = self.values[use.data]
        if data.axis != -(rank - 1) or data.size != use.groups:
            return self._pin(use.data, "channel_axis_not_contracted")
        if use.bias and self.constant(use.bias) is None:
            return self._pin(use.data, "runtime_bias")
        if self.assume_dead:  # weights and bias zeroed: every output channel is 0 (neither is read)
            const, value = np.ones(use.groups, bool), np.zeros(use.groups)
        else:
            weight = self.store.array(use.weight).reshape(use.groups, -1).astype(np.float64)
            bias = self.constant(use.bias).astype(np.float64) if use.bias else np.zeros(use.groups)
            zero_rows = ~weight.any(axis=1)
            const = zero_rows | (data.const & (data.value == 0 if _has_padding(node) else True))
            value = np.where(zero_rows, bias, data.value * weight.sum(axis=1) + bias)
        self.values[node.output[0]] = replace(data, const=const, value=np.where(const, value, 0.0))
        self.producers.append(Producer(node, use, node.output[0], depthwise=True))

    def _per_channel(self, node: onnx.NodeProto, data: Channels, feeds: dict[str, np.ndarray],
                     data_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate a channel-wise node on the constant channels: (still constant, values)."""
        rank = data.rank if data.rank is not None else -min(data.axes)
        shape = [1] * rank
        grid = data.value if data.inner is None else data.value.reshape(data.heads, data.inner[1])
        for axis, size in zip(data.axes, grid.shape):
            shape[rank + axis] = size
        if len(data.axes) == 2 and data.axes[1] < data.axes[0]:  # head size before heads in the value
            grid = grid.T
        dtype = next((v.dtype for v in feeds.values() if v.dtype.kind == "f"), np.dtype(np.float32))
        feeds = {**feeds, data_name: grid.astype(dtype).reshape(shape)}
        result = self._evaluate(node, feeds)
        if result is None:
            return np.zeros(data.size, bool), np.zeros(data.size)
        result = np.asarray(result, dtype=np.float64)
        axes = [result.ndim + axis for axis in data.axes]
        result = np.moveaxis(result, axes, list(range(len(axes)))).reshape(data.size, -1)
        uniform = (result == result[:, :1]).all(axis=1) & np.isfinite(result[:, 0])
        const = data.const & uniform
        self._lose(data, const, f"{node.op_type}_of_constant_not_constant")
        return const, np.where(const, result[:, 0], 0.0)

    def _visit_unary(self, node: onnx.NodeProto) -> None:
        data = self.values[node.input[0]]
        extras = {name: self.constant(name) for name in node.input[1:] if name}
        if any(v is None for v in extras.values()):
            return self._pin(node.input[0], f"runtime_operand_{node.op_type}")
        const, value = self._per_channel(node, data, extras, node.input[0])
        self.values[node.output[0]] = replace(data, const=const, value=value)

    def _visit_pool(self, node: onnx.NodeProto) -> None:
        data = self.values[node.input[0]]
        if data.positive_axis != 1:
            return self._pin(node.input[0], "channel_axis_not_1")
        const = data.const
        if node.op_type == "AveragePool" and attribute(node, "count_include_pad", 0) and _has_padding(node):
            const = const & (data.value == 0)
        self.values[node.output[0]] = replace(data, const=const, value=np.where(const, data.value, 0.0))

    def _visit_batchnorm(self, node: onnx.NodeProto) -> None:
        data = self.values[node.input[0]]
        params = [self.constant(name) for name in node.input[1:5]]
        if data.positive_axis != 1 or any(p is None for p in params):
            return self._pin(node.input[0], "batchnorm_not_per_channel")
        if not self._sliceable(node, range(1, 5), node.input[0], axis=0):
            return
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        value = (data.value - mean) / np.sqrt(var + attribute(node, "epsilon", 1e-5)) * scale + bias
        self.values[node.output[0]] = replace(data, value=np.where(data.const, value, 0.0))

    def _sliceable(self, node: onnx.NodeProto, positions, channel_value: str, axis: int) -> bool:
        """Record constant inputs to slice along ``axis`` with the channels; shared ones pin instead."""
        size = self.values[channel_value].size
        for pos in positions:
            name = node.input[pos]
            array = self.constant(name)
            if array.ndim < -axis if axis < 0 else array.ndim <= axis:
                continue
            if array.shape[axis] not in (1, size):
                self._pin(channel_value, "operand_not_per_channel")
                return False
            if array.shape[axis] == size and size > 1:
                if name in self.store and self.readers(name) > 1:
                    self._pin(channel_value, "shared_constant")
                    return False
                self.sliced_constants.append((node, pos, channel_value, axis))
        return True

    def _visit_binary(self, node: onnx.NodeProto, carried: list[str]) -> None:
        a, b = node.input
        if a in self.values and b in self.values:
            ca, cb = self.values[a], self.values[b]
            if ca.axis != cb.axis or ca.size != cb.size or ca.inner != cb.inner:
                return self._pin_all(carried, "operands_not_aligned")
            self._unions.append((ca.ids, cb.ids))
            result = self._evaluate(node, {a: ca.value.astype(np.float32), b: cb.value.astype(np.float32)})
            value = np.full(ca.size, np.nan) if result is None else np.asarray(result, np.float64)
            const = ca.const & cb.const
            if node.op_type == "Mul":  # 0 * anything is 0: a zero channel annihilates the other side
                const |= (ca.const & (ca.value == 0)) | (cb.const & (cb.value == 0))
                value = np.where(const & ~(ca.const & cb.const), 0.0, value)
            const &= np.isfinite(value)
            rank = None if ca.rank is None or cb.rank is None else max(ca.rank, cb.rank)
            self.values[node.output[0]] = replace(ca, rank=rank, const=const, value=np.where(const, value, 0.0))
            return
        carried_name = carried[0]
        other_pos = 1 if carried_name == a else 0
        other_name = node.input[other_pos]
        other = self.constant(other_name)
        data = self.values[carried_name]
        if other is None:
            return self._visit_runtime_operand(node, data, other_name, carried_name)
        if data.inner is not None:
            if any(other.ndim >= -axis and other.shape[axis] != 1 for axis in data.axes):
                return self._pin(carried_name, "operand_not_per_head")
        elif not self._sliceable(node, [other_pos], carried_name, axis=data.axis):
            return
        const, value = self._per_channel(node, data, {other_name: other}, carried_name)
        if node.op_type == "Mul" and data.inner is None:  # a zero factor makes its channel zero, whatever x is
            zero = self._zero_per_channel(other, data)
            const, value = const | zero, np.where(zero, 0.0, value)
        rank = None if data.rank is None else max(data.rank, other.ndim)
        self.values[node.output[0]] = replace(data, rank=rank, const=const, value=value)

    @staticmethod
    def _zero_per_channel(array: np.ndarray, data: Channels) -> np.ndarray:
        """Channels on which a constant operand is zero everywhere."""
        if array.ndim < -data.axis or array.shape[data.axis] == 1:
            return np.full(data.size, not array.any())
        return ~np.moveaxis(array, data.axis, 0).reshape(data.size, -1).any(axis=1)

    def _visit_runtime_operand(self, node: onnx.NodeProto, data: Channels, other: str, carried_name: str) -> None:
        """``x op r`` with ``r`` computed at run time and the same on every channel (a mask, a mean): each
        channel still maps to itself, but is no longer constant (except 0 * r)."""
        shape = self.shapes.get(other)
        if shape is None or any(len(shape) >= -axis and shape[axis] != 1 for axis in data.axes):
            return self._pin(carried_name, f"runtime_operand_{node.op_type}")
        const = data.const & (data.value == 0) if node.op_type == "Mul" else np.zeros(data.size, bool)
        self._lose(data, const, f"runtime_operand_{node.op_type}")
        rank = None if data.rank is None else max(data.rank, len(shape))
        self.values[node.output[0]] = replace(data, rank=rank, const=const, value=np.where(const, data.value, 0.0))

    def _visit_concat(self, node: onnx.NodeProto, carried: list[str]) -> None:
        parts = [self.values.get(name) for name in node.input]
        axis = attribute(node, "axis")
        first = parts[0]
        aligned = all(p is not None for p in parts) and all(
            p.axis == first.axis and p.rank == first.rank for p in parts)
        if not aligned or (axis != first.axis and axis != first.positive_axis):
            return self._pin_all(carried, "concat_not_on_channels")
        self.values[node.output[0]] = replace(
            first, ids=np.concatenate([p.ids for p in parts]), const=np.concatenate([p.const for p in parts]),
            value=np.concatenate([p.value for p in parts]))

    def _visit_reshape(self, node: onnx.NodeProto) -> None:
        """Split the channel axis into heads, join heads back, keep the last axis, or flatten channel blocks."""
        data = self.values[node.input[0]]
        source, shape = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        target = self.constant(node.input[1])
        known = source is not None and shape is not None and target is not None and len(target) == len(shape) > 0
        if data.inner is not None:
            if known and self._joins_heads(node, data, source, shape, target):
                return
            return self._pin(node.input[0], "reshape_mixes_heads")
        if known and data.axis == -1 and data.rank == len(source) and isinstance(shape[-1], int):
            if shape[-1] == data.size and self._keeps_last_axis(node, data, source, shape, target):
                return
            if len(shape) >= 2 and self._splits_heads(node, data, source, shape, target):
                return
        self._visit_flatten(node)

    @staticmethod
    def _reshaped(node: onnx.NodeProto, target: np.ndarray, entries: tuple[int, ...], first_channel: int) -> bool:
        """No 0 in ``target`` copies a source channel axis (from ``first_channel`` on) or stands at ``entries``."""
        zeros = np.flatnonzero(target == 0)
        return not (zeros.size and (attribute(node, "allowzero", 0) or zeros.max() >= first_channel
                                    or any(target[e] == 0 for e in entries)))

    def _keeps_last_axis(self, node, data: Channels, source, shape, target) -> bool:
        """``(..., C) -> (..., C)`` with the leading dims regrouped: the channels stay on the last axis."""
        if not (_same_extent(source[:-1], shape[:-1]) and self._reshaped(node, target, (-1,), len(source) - 1)):
            return False
        if target[-1] > 0:
            self.reshapes.append((node, node.input[0], len(target) - 1, 1, 1))
        self.values[node.output[0]] = replace(data, rank=len(shape))
        return True

    def _splits_heads(self, node, data: Channels, source, shape, target) -> bool:
        """``(..., H * d) -> (..., H, d)``: each head's channels become one variable."""
        heads, size = shape[-2], shape[-1]
        if not (isinstance(heads, int) and heads > 1 and heads * size == data.size
                and _same_extent(source[:-1], shape[:-2]) and self._reshaped(node, target, (-2, -1), len(source) - 1)
                and (target[-2] > 0 or target[-1] > 0)):
            return False
        if target[-2] > 0:  # the head count is spelled out: it shrinks with the heads removed
            self.reshapes.append((node, node.input[0], len(target) - 2, 1, size))
        self._unions.append((data.ids, np.repeat(data.ids[::size], size)))
        self.heads.append(data.ids[::size])
        self.values[node.output[0]] = replace(data, axis=-2, rank=len(shape), inner=(-1, size))
        return True

    def _joins_heads(self, node, data: Channels, source, shape, target) -> bool:
        """``(..., H, d) -> (..., H * d)``: back to one channel axis, in the original order."""
        if not (data.axis == -2 and data.inner[0] == -1 and data.rank == len(source) and shape[-1] == data.size
                and _same_extent(source[:-2], shape[:-1]) and self._reshaped(node, target, (-1,), len(source) - 2)):
            return False
        if target[-1] > 0:
            self.reshapes.append((node, node.input[0], len(target) - 1, 1, 1))
        self.values[node.output[0]] = replace(data, axis=-1, rank=len(shape), inner=None)
        return True

    def _visit_transpose(self, node: onnx.NodeProto) -> None:
        data = self.values[node.input[0]]
        perm = attribute(node, "perm")
        rank = data.rank if data.rank is not None else (len(perm) if perm is not None else None)
        if rank is None:
            return self._pin(node.input[0], "transpose_rank_unknown")
        perm = list(perm) if perm is not None else list(range(rank))[::-1]
        moved = [perm.index(rank + axis) - rank for axis in data.axes]
        inner = None if data.inner is None else (moved[1], data.inner[1])
        self.values[node.output[0]] = replace(data, axis=moved[0], rank=rank, inner=inner)

    def _visit_softmax(self, node: onnx.NodeProto) -> None:
        """Softmax along an axis that is not a channel axis keeps every channel (head) to itself."""
        data = self.values[node.input[0]]
        rank = data.rank
        axis = attribute(node, "axis", -1 if self.opset >= 13 else 1)
        if rank is None:
            return self._pin(node.input[0], "consumer_Softmax")
        axis %= rank
        channel_axes = [rank + a for a in data.axes]
        mixes = axis in channel_axes if self.opset >= 13 else max(channel_axes) >= axis  # before 13: axes [axis:]
        if mixes:
            return self._pin(node.input[0], "consumer_Softmax")
        const = np.zeros(data.size, bool)
        self._lose(data, const, "Softmax")
        self.values[node.output[0]] = replace(data, const=const, value=np.zeros(data.size))

    def _sums_to_one(self, name: str, rank: int | None) -> bool:
        """Whether ``name`` is a Softmax over its last axis (rows that sum to one)."""
        node = self.index.producer_node(name)
        if node is None or node.op_type != "Softmax" or node.domain not in STANDARD_DOMAINS or rank is None:
            return False
        return attribute(node, "axis", -1 if self.opset >= 13 else 1) % rank == rank - 1

    def _visit_matmul(self, node: onnx.NodeProto, carried: list[str]) -> None:
        """A MatMul of two run-time values inside attention: scores (Q·Kᵀ) or context (probabilities · V)."""
        a, b = node.input
        left, right = self.values.get(a), self.values.get(b)
        ranks = [v.rank if v is not None else self._rank(n) for v, n in ((left, a), (right, b))]
        if None in ranks or min(ranks) < 3:
            return self._pin_all(carried, "matmul_channels_not_batched")
        rank = max(ranks)
        if right is not None and right.inner is not None and right.inner[0] == -1 and right.axis <= -3:
            # probabilities (B, H, S, S) · V (B, H, S, d): each V head is mixed over positions only
            if not self._same_heads(left, right, a, carried):
                return
            const = right.const & ((right.value == 0) | self._sums_to_one(a, ranks[0]))
            self._lose(right, const, "MatMul_of_unnormalized_rows")
            self.values[node.output[0]] = replace(right, rank=rank, const=const, value=np.where(const, right.value, 0))
        elif (left is not None and right is not None and left.inner is not None and right.inner is not None
              and left.axis == right.axis <= -3 and left.inner[0] == -1 and right.inner[0] == -2
              and left.inner[1] == right.inner[1] and left.heads == right.heads):
            # Q (B, H, S, d) · Kᵀ (B, H, d, S): the head size is summed away, one score map per head
            self._unions.append((left.head_ids, right.head_ids))
            const = np.zeros(left.heads, bool)
            self._lose(left, np.zeros(left.size, bool), "MatMul_scores")
            self._lose(right, np.zeros(right.size, bool), "MatMul_scores")
            self.values[node.output[0]] = Channels(left.head_ids, left.axis, rank, const, np.zeros(left.heads))
        elif left is not None and left.inner is None and left.axis <= -3 and self._same_heads(right, left, b, carried):
            const = np.zeros(left.size, bool)
            self._lose(left, const, "MatMul")
            self.values[node.output[0]] = replace(left, rank=rank, const=const, value=np.zeros(left.size))
        else:
            self._pin_all(carried, "matmul_mixes_channels")

    def _same_heads(self, other: Channels | None, data: Channels, other_name: str, carried: list[str]) -> bool:
        """The other MatMul operand carries the same heads on the same batch axis (joined), or broadcasts there."""
        heads = data.head_ids if data.inner is not None else data.ids
        if other is None:
            shape = self.shapes.get(other_name)
            if shape is not None and (len(shape) < -data.axis or shape[data.axis] == 1):
                return True
            self._pin_all(carried, "matmul_runtime_operand")
            return False
        if other.inner is None and other.axis == data.axis and other.size == len(heads):
            self._unions.append((other.ids, heads))
            return True
        self._pin_all(carried, "matmul_mixes_channels")
        return False

    def _visit_reduce(self, node: onnx.NodeProto) -> None:
        """ReduceSum / ReduceMean: over other axes the channels stay; a sum over the channels drops only zeros."""
        data = self.values[node.input[0]]
        if data.rank is None:
            return self._pin(node.input[0], f"{node.op_type}_rank_unknown")
        axes = attribute(node, "axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self.constant(node.input[1])
            if axes is None:
                return self._pin(node.input[0], f"{node.op_type}_axes_unknown")
        if axes is None or not len(axes):
            if attribute(node, "noop_with_empty_axes", 0):
                self.values[node.output[0]] = data
                return
            axes = range(data.rank)
        reduced = sorted({int(a) % data.rank for a in axes})
        channel_axes = [data.rank + a for a in data.axes]
        if set(reduced) & set(channel_axes):
            if node.op_type != "ReduceSum" or data.inner is not None:  # a mean's count would change
                return self._pin(node.input[0], f"{node.op_type.lower()}_over_channels")
            self.zero_exits.append((node.input[0], "summed_over_channels_while_not_zero"))
            return
        keepdims = attribute(node, "keepdims", 1)
        rank = data.rank if keepdims else data.rank - len(reduced)
        moved = [a if keepdims else a + sum(r > data.rank + a for r in reduced) for a in data.axes]
        const = data.const & ((data.value == 0) | (node.op_type == "ReduceMean"))
        self._lose(data, const, f"{node.op_type}_of_constant")
        inner = None if data.inner is None else (moved[1], data.inner[1])
        self.values[node.output[0]] = replace(data, axis=moved[0], rank=rank, inner=inner, const=const,
                                              value=np.where(const, data.value, 0.0))

    def _visit_flatten(self, node: onnx.NodeProto) -> None:
        """``(N, C, *spatial) -> (N, C * prod(spatial))``: each channel becomes a block of features."""
        data = self.values[node.input[0]]
        shape = self.shapes.get(node.input[0])
        known = shape is not None and all(isinstance(d, int) and d > 0 for d in shape[2:])
        if data.positive_axis != 1 or not known or len(shape) != data.rank:
            return self._pin(node.input[0], f"{node.op_type.lower()}_shape_unknown")
        block = int(np.prod(shape[2:], dtype=np.int64))
        if node.op_type == "Flatten":
            ok = attribute(node, "axis", 1) == 1
        else:
            target = self.constant(node.input[1])
            ok = (target is not None and target.shape == (2,) and target[1] in (-1, data.size * block)
                  and (target[0] == -1 or target[0] == shape[0]
                       or (target[0] == 0 and not attribute(node, "allowzero", 0))))
            if ok and target[1] != -1:
                if node.input[1] in self.store and self.readers(node.input[1]) > 1:
                    return self._pin(node.input[0], "shared_constant")
                self.reshapes.append((node, node.input[0], 1, block, 1))
        if not ok:
            return self._pin(node.input[0], f"{node.op_type.lower()}_not_channel_blocks")
        self.values[node.output[0]] = Channels(np.repeat(data.ids, block), -1, 2, np.repeat(data.const, block),
                                               np.repeat(data.value, block))

    def _rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    # ----------------------------------------------------------------------- decision

    def _resolve(self) -> np.ndarray:
        """Root variable of each variable after joining the groups of element-wise operands."""
        return union_roots(self._variables, self._unions)

    def _blocked(self) -> np.ndarray:
        """Variables that must stay: pinned, or not a foldable constant at some consumer.

        Also counts in ``kept``, per reason, the groups with a dead source row that still stay.
        """
        blocked = np.zeros(self._variables, bool)
        reasons: dict[str, list[np.ndarray]] = defaultdict(list)
        for ids, reason in [*self._pins, *self._lost]:
            reasons[reason].append(ids)
        for ids, _ in self._pins:
            blocked[self.roots[ids]] = True
        for node, use in self.exits:
            data = self.values[use.data]
            foldable = data.const & ((data.value == 0) | self._can_fold(node, use))
            np.logical_or.at(blocked, self.roots[data.ids], ~foldable)
            reasons[f"constant_not_foldable_into_{node.op_type}"].append(data.ids[data.const & ~foldable])
        for name, reason in self.zero_exits:
            data = self.values[name]
            zero = data.const & (data.value == 0)
            np.logical_or.at(blocked, self.roots[data.ids], ~zero)
            reasons[reason].append(data.ids[~zero])
        dead = np.zeros(self._variables, bool)  # groups with a dead source row (a head: its V, Q or K)
        for ids, const in self._sources:
            dead[self.roots[ids[const]]] = True
        kept = blocked & dead
        for reason, parts in sorted(reasons.items()):
            hit = np.unique(self.roots[np.concatenate(parts)])
            if n := int(kept[hit].sum()):
                self.kept[reason] += n
        return blocked

    def _can_fold(self, node: onnx.NodeProto, use: WeightUse) -> bool:
        """Whether a consumer can absorb a non-zero constant input channel into its bias."""
        if use.bias is not None and self.constant(use.bias) is None:
            return False
        return node.op_type != "Conv" or not _has_padding(node)

    def head_count(self, chosen: np.ndarray) -> int:
        """How many of the chosen groups (by root) are attention heads."""
        if not self.heads:
            return 0
        return int(chosen[np.unique(self.roots[np.concatenate(self.heads)])].sum())

    def keep_mask(self, name: str, removed: np.ndarray) -> np.ndarray:
        return ~removed[self.roots[self.values[name].ids]]

    def removable(self) -> np.ndarray:
        """Removed roots (by variable id); every channel value keeps at least one channel."""
        removed = ~self.blocked
        removed[self.roots != np.arange(self._variables)] = False
        for channels in self.values.values():
            roots = self.roots[channels.ids]
            if removed[roots].all():
                removed[roots[0]] = False
        self.balance(removed)
        return removed

    def balance(self, removed: np.ndarray) -> None:
        """Restore removed channels until each grouped Conv loses equally many from every group.

        Restoring is always safe (a kept channel stays exact), so this only shrinks ``removed``
        and ends; in each group the first ``min`` removed channels stay removed.
        """
        changed = True
        while changed:
            changed = False
            for ids, groups in self.balanced:
                roots = self.roots[ids]
                blocks = removed[roots].reshape(groups, -1)
                fewest = blocks.sum(axis=1).min()
                restore = blocks & (np.cumsum(blocks, axis=1) > fewest)
                if restore.any():
                    removed[roots[restore.ravel()]] = False
                    changed = True


def union_roots(count: int, links: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Union-find over ``count`` items joined pairwise by ``links``: the smallest member of each set, per item."""
    parent = list(range(count))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a_ids, b_ids in links:
        for a, b in zip(a_ids.tolist(), b_ids.tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(count)], dtype=np.int64)


def has_producers(model: onnx.ModelProto) -> bool:
    """Whether any graph has a MatMul / Gemm / Conv with a constant weight: the only channel sources.

    Without one there is nothing to analyse, and the shape inference the analysis needs is skipped.
    """
    for graph in walk_graphs(model.graph):
        store = WeightStore(graph)
        if any(weight_use(node, store) is not None for node in graph.node):
            return True
    return False


def _same_extent(a: tuple, b: tuple) -> bool:
    """Whether two runs of dims hold the same number of elements (equal symbolic dims, equal integer products)."""
    if any(d is None for d in (*a, *b)):
        return False
    symbols = sorted(d for d in a if isinstance(d, str)), sorted(d for d in b if isinstance(d, str))
    return symbols[0] == symbols[1] and math.prod(d for d in a if isinstance(d, int)) == math.prod(
        d for d in b if isinstance(d, int))


def _has_padding(node: onnx.NodeProto) -> bool:
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad not in ("NOTSET", "VALID") or any(attribute(node, "pads", []) or [])


