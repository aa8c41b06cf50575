"""zero-rows: remove output neurons / channels that carry an input-independent value, exactly.

Design: dependency groups of channel variables. Every MatMul / Gemm / Conv output (a *source*)
creates one variable per output channel. Values derived channel by channel (bias adds,
BatchNorm, activations, pools, depthwise Conv, residual Add, SE-style Mul, Concat,
Flatten/Reshape into a classifier) carry those variables along; an element-wise op whose two
operands both carry channels joins their variables into one group. Along the way each value
records which of its channels are constant and their values (a source row of zeros gives its
bias; the constant then flows through the per-channel ops, so an activation of a bias is folded
correctly).

A variable is removed when (a) it reaches no value the analysis does not understand (graph
outputs, unknown consumers, grouped Conv, shared weights: those *pin* it, counted as
``skipped_<reason>``), (b) wherever it is contracted by a consumer MatMul / Gemm / Conv it
holds a constant the consumer can fold into its bias (any constant for Gemm / MatMul / unpadded
Conv, only zero for a padded Conv), and (c) a grouped Conv it enters or leaves loses equally many
channels from every group. Removing it then slices the sources, every per-channel
parameter and the consumers' input axes; no other channel changes, so outputs stay the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..graph import (STANDARD_DOMAINS, ConstantResolver, GraphIndex, NodeEvaluationError, WeightStore, evaluate_node,
                     filter_field, node_subgraphs, opset_version, unique_name_factory, value_shapes, walk_graphs)
from .base import Pass, PassResult
from .weights import BiasAdder, WeightUse, attribute, from_canonical, to_canonical, weight_use

# Ops that map each channel to itself, element by element (extra inputs must be constants).
CHANNELWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Neg", "Abs", "Exp",
    "Erf", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
}
CHANNELWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
# Ops whose derived constant outputs (of constant inputs) the analysis computes itself.
@dataclass(eq=False)
class Channels:
    """A value carrying channels on ``axis`` (negative): the variable at each position and its constants."""

    ids: np.ndarray          # channel variable per position
    axis: int                # negative axis of the channel dimension
    rank: int | None         # the value's rank when known
    const: np.ndarray        # position holds an input-independent value
    value: np.ndarray        # that value (float64; 0 where not constant)

    @property
    def size(self) -> int:
        return len(self.ids)

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
        self.reshapes: list[tuple[onnx.NodeProto, str, int]] = []           # node, channel value, block size
        self.balanced: list[tuple[np.ndarray, int]] = []  # grouped Conv sides: channels, groups
        self.constants = ConstantResolver(self.index, self.store, self.opset)
        self._unions: list[tuple[np.ndarray, np.ndarray]] = []
        self._pins: list[np.ndarray] = []
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
        self._pins.append(self.values[name].ids)
        self.skips[reason] += 1

    def _visit(self, node: onnx.NodeProto, position: int) -> None:
        carried = [n for n in dict.fromkeys(self.index.uses[position]) if n in self.values]
        use = weight_use(node, self.store)
        if next(node_subgraphs(node), None) is not None:
            for name in carried:
                self._pin(name, "used_in_subgraph")
            return
        if use is not None:
            self._pin_all([n for n in carried if n != use.data], f"consumer_{node.op_type}")
            self._visit_weighted(node, use)
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
        elif op in ("Flatten", "Reshape") and carried == [node.input[0]]:
            self._visit_flatten(node)
        else:
            self._pin_all(carried, f"consumer_{op}")

    def _pin_all(self, names: list[str], reason: str) -> None:
        for name in names:
            self._pin(name, reason)

    def _visit_weighted(self, node: onnx.NodeProto, use: WeightUse) -> None:
        weight = self.store.tensor(use.weight)
        rank = len(weight.dims)
        if node.op_type == "Conv" and use.groups == weight.dims[0] > 1 and weight.dims[1] == 1:
            if use.data in self.values and not self._excluded_or_shared(node, use):
                self._visit_depthwise(node, use, rank)
            return
        whole = self._excluded_or_shared(node, use)
        if use.data in self.values and not whole and self._check_exit(node, use, rank):
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
        self.producers.append(Producer(node, use, out))
        if use.groups > 1:
            self.balanced.append((self.values[out].ids, use.groups))
        if use.bias and self.constant(use.bias) is None:
            self._pin(out, "runtime_bias")
        elif whole:
            self._pin(out, self._whole_reason(node))

    def _excluded_or_shared(self, node: onnx.NodeProto, use: WeightUse) -> bool:
        """Excluded producers and weights read by several nodes stay whole (slicing would copy them)."""
        whole = node.name in self.exclude_nodes or self.readers(use.weight) > 1 or (
            use.bias is not None and use.bias in self.store and self.readers(use.bias) > 1)
        if whole and use.data in self.values:
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
        rank = data.rank if data.rank is not None else -data.axis
        shape = [1] * rank
        shape[rank + data.axis] = data.size
        dtype = next((v.dtype for v in feeds.values() if v.dtype.kind == "f"), np.dtype(np.float32))
        feeds = {**feeds, data_name: data.value.astype(dtype).reshape(shape)}
        result = self._evaluate(node, feeds)
        if result is None:
            return np.zeros(data.size, bool), np.zeros(data.size)
        result = np.asarray(result, dtype=np.float64)
        result = np.moveaxis(result, result.ndim + data.axis, 0).reshape(data.size, -1)
        uniform = (result == result[:, :1]).all(axis=1) & np.isfinite(result[:, 0])
        const = data.const & uniform
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
            if ca.axis != cb.axis or ca.size != cb.size:
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
        other = self.constant(node.input[other_pos])
        if other is None:
            return self._pin(carried_name, f"runtime_operand_{node.op_type}")
        data = self.values[carried_name]
        if not self._sliceable(node, [other_pos], carried_name, axis=data.axis):
            return
        const, value = self._per_channel(node, data, {node.input[other_pos]: other}, carried_name)
        rank = None if data.rank is None else max(data.rank, other.ndim)
        self.values[node.output[0]] = replace(data, rank=rank, const=const, value=value)

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
                self.reshapes.append((node, node.input[0], block))
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
        """Variables that must stay: pinned, or not a foldable constant at some consumer."""
        blocked = np.zeros(self._variables, bool)
        for ids in self._pins:
            blocked[self.roots[ids]] = True
        for node, use in self.exits:
            data = self.values[use.data]
            foldable = data.const & ((data.value == 0) | self._can_fold(node, use))
            np.logical_or.at(blocked, self.roots[data.ids], ~foldable)
        return blocked

    def _can_fold(self, node: onnx.NodeProto, use: WeightUse) -> bool:
        """Whether a consumer can absorb a non-zero constant input channel into its bias."""
        if use.bias is not None and self.constant(use.bias) is None:
            return False
        return node.op_type != "Conv" or not _has_padding(node)

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


def _has_padding(node: onnx.NodeProto) -> bool:
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad not in ("NOTSET", "VALID") or any(attribute(node, "pads", []) or [])


class ZeroRows(Pass):
    name = "zero-rows"
    summary = "remove neurons/channels whose weight rows are zero, folding their constant into consumers"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"channels_removed": 0, "parameters_removed": 0}
        if not has_producers(model):
            return PassResult(model, False, stats)
        shapes = value_shapes(model)
        new_name = unique_name_factory(model)
        opset = opset_version(model)
        for graph in walk_graphs(model.graph):
            analysis = ChannelGraph(graph, opset, shapes if graph is model.graph else {})
            for reason, n in sorted(analysis.skips.items()):
                stats[f"skipped_{reason}"] = stats.get(f"skipped_{reason}", 0) + n
            removed = analysis.removable()
            if removed.any():
                removal = ChannelRemoval(analysis, removed, new_name)
                removal.apply()
                stats["channels_removed"] += int(removed.sum())
                stats["parameters_removed"] += removal.parameters_removed
        return PassResult(model, stats["channels_removed"] > 0, stats)


class ChannelRemoval:
    """Slice every tensor a removed channel touches and fold constant channels into consumer biases.

    ``parameters_removed`` counts the tensor elements the rewrite takes out of the graph, net of
    those it adds (new initializers for shared constants, folded biases).
    """

    def __init__(self, analysis: ChannelGraph, removed: np.ndarray, new_name) -> None:
        self.analysis = analysis
        self.store = analysis.store
        self.new_name = new_name
        self.keep = {name: analysis.keep_mask(name, removed) for name in analysis.values}
        self.bias = BiasAdder(analysis.index, analysis.store, new_name, analysis.constant)
        self.resized: set[str] = set()  # constants rewritten in place (their value_info goes stale)
        self.sliced = 0  # elements removed by _write (net of new initializers)

    @property
    def parameters_removed(self) -> int:
        return self.sliced - self.bias.added

    def apply(self) -> None:
        keep = self.keep
        for producer in self.analysis.producers:
            mask = keep[producer.output]
            if not mask.all():
                self._slice_producer(producer, mask)
        for node, use in self.analysis.exits:
            mask = keep[use.data]
            if not mask.all():
                self._slice_consumer(node, use, mask)
        for node, position, channel_value, axis in self.analysis.sliced_constants:
            mask = keep[channel_value]
            if not mask.all():
                self._write(node, position, np.compress(mask, self.analysis.constant(node.input[position]), axis))
        for node, channel_value, block in self.analysis.reshapes:
            mask = keep[channel_value]
            if not mask.all():
                target = self.analysis.constant(node.input[1]).copy()
                target[1] = int(mask.sum()) * block
                self._write(node, 1, target)
        self.bias.finish()
        graph = self.analysis.graph
        changed = {name for name, mask in keep.items() if not mask.all()} | self.resized
        filter_field(graph.value_info, lambda v: v.name not in changed)

    def _write(self, node: onnx.NodeProto, position: int, array: np.ndarray) -> None:
        """New values for a node's constant input: in place when only it reads them, else a new initializer."""
        name = node.input[position] if position < len(node.input) else ""
        if name in self.store and self.analysis.readers(name) == 1:
            self.sliced += int(np.prod(self.store.tensor(name).dims, dtype=np.int64)) - array.size
            self.store.set_array(name, array)
            self.resized.add(name)
            return
        fresh = self.new_name(f"{name or node.name or node.op_type}_zero_rows")
        self.store.add_initializer(fresh, array)
        self.sliced -= array.size
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = fresh

    def _slice_producer(self, producer: Producer, mask: np.ndarray) -> None:
        node, use = producer.node, producer.use
        self._write(node, 1, np.compress(mask, self.store.array(use.weight), axis=use.out_axis))
        bias = _input_constant(self.analysis, node, 2)
        if bias is not None and bias.ndim and bias.shape[-1] == mask.size and mask.size > 1:
            self._write(node, 2, np.compress(mask, bias, axis=-1))
        if producer.depthwise:
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = int(mask.sum())

    def _slice_consumer(self, node: onnx.NodeProto, use: WeightUse, mask: np.ndarray) -> None:
        """Drop input channels; in a grouped Conv each output reads only its group's inputs."""
        weight = self.store.array(use.weight)
        canonical = to_canonical(weight, use)  # (out, ..., in per group)
        groups = use.groups
        blocks = canonical.reshape(groups, canonical.shape[0] // groups, -1, canonical.shape[-1])
        keep = mask.reshape(groups, -1)
        constants = np.where(keep, 0.0, self.analysis.values[use.data].value.reshape(groups, -1))
        if constants.any():
            delta = np.einsum("gmc,gc->gm", blocks.astype(np.float64).sum(axis=2), constants).ravel()
            if node.op_type == "Gemm":
                delta = delta * attribute(node, "alpha", 1.0)
            self.bias.add(node, delta.astype(weight.dtype))
        kept = np.argsort(~keep, axis=1, kind="stable")[:, : keep[0].sum()]  # kept positions, in order
        sliced = np.take_along_axis(blocks, kept[:, None, None, :], axis=-1)
        self._write(node, 1, from_canonical(sliced.reshape(*canonical.shape[:-1], kept.shape[1]), use))


def _input_constant(analysis: ChannelGraph, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    """A node's constant input as it is now (a rewrite may have pointed it at a new initializer)."""
    name = node.input[position] if position < len(node.input) else ""
    return analysis.constant(name) if name else None

