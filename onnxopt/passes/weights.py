"""Prunable weights and their layout, shared by prune and prune-neurons (and zero-rows' layouts and biases).

A weight is the constant operand of a MatMul, Gemm or Conv. Its layout says which axis holds
output neurons / channels and which holds input features, so pruning code can work on one
canonical view, ``(out, ..., in)``, whatever the op and its ``transB``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import STANDARD_DOMAINS, GraphIndex, WeightStore, replace_nodes, walk_graphs
from ..tensors import FLOAT_TYPES
from .base import count


@dataclass(eq=False)
class WeightUse:
    """One node reading a constant weight: where the weight, its bias and its data input are."""

    node: onnx.NodeProto
    weight: str
    bias: str | None      # Gemm C / Conv B (may be absent or a runtime value)
    data: str             # the activation multiplied by the weight
    out_axis: int         # weight axis of output neurons / channels
    in_axis: int          # weight axis of input features / channels
    data_axis: int        # axis of ``data`` holding the input features
    groups: int = 1       # Conv groups

    @property
    def layout(self) -> tuple[int, int, int]:
        return self.out_axis, self.in_axis, self.groups


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def weight_use(node: onnx.NodeProto, store: WeightStore, ranks: dict[str, int] | None = None) -> WeightUse | None:
    """The layout of a MatMul / Gemm / Conv whose second input is a constant weight, else None.

    ``ranks`` gives weight ranks when known already (avoids reading the tensor).
    """
    if node.domain not in STANDARD_DOMAINS or len(node.input) < 2:
        return None
    data, weight = node.input[0], node.input[1]
    if not data or weight not in store or data in store:
        return None
    rank = ranks[weight] if ranks and weight in ranks else len(store.tensor(weight).dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "MatMul" and rank == 2:
        return WeightUse(node, weight, None, data, out_axis=1, in_axis=0, data_axis=-1)
    if node.op_type == "Gemm" and rank == 2:
        trans_b = attribute(node, "transB", 0)
        data_axis = 0 if attribute(node, "transA", 0) else 1
        return WeightUse(node, weight, bias, data, out_axis=0 if trans_b else 1, in_axis=1 if trans_b else 0,
                         data_axis=data_axis)
    if node.op_type == "Conv" and rank >= 3:
        return WeightUse(node, weight, bias, data, out_axis=0, in_axis=1, data_axis=1,
                         groups=attribute(node, "group", 1))
    return None


def to_canonical(array: np.ndarray, use: WeightUse) -> np.ndarray:
    """The weight as ``(out, ..., in)``: output axis first, input axis last (Conv kernels between)."""
    return np.moveaxis(array, (use.out_axis, use.in_axis), (0, -1))


def from_canonical(array: np.ndarray, use: WeightUse) -> np.ndarray:
    return np.moveaxis(array, (0, -1), (use.out_axis, use.in_axis))


def per_input_channel(canonical_shape: tuple[int, ...], values: np.ndarray, groups: int) -> np.ndarray:
    """Per input channel values (activation norms, means) broadcast onto a canonical weight (grouped Conv aware).

    In a grouped Conv, output channel ``m`` reads input channels of group ``m // (M / groups)``.
    """
    out, per_group = canonical_shape[0], canonical_shape[-1]
    by_group = values.reshape(groups, per_group)
    per_out = np.repeat(by_group, out // groups, axis=0)
    return per_out.reshape(out, *([1] * (len(canonical_shape) - 2)), per_group)


class BiasAdder:
    """Adds a constant per output channel to MatMul / Gemm / Conv outputs, the node's outputs otherwise unchanged.

    The sum goes into the bias input (in place when only this node reads it, else into a new
    initializer); a MatMul, or a node whose bias is computed at run time, gets an ``Add`` after
    it. ``index`` and ``store`` are the caller's, of the same graph (the index as built before any
    rewrite: a bias is changed in place only when it had one reader). ``constant`` reads a
    constant input (default: the store's weights). Call :meth:`finish` once at the end to insert
    the new nodes. ``added`` counts the parameters (tensor elements) this adds to the graph.
    Where a MatMul's only reader is already a bias ``Add`` of a constant only it reads (MatMul + Add
    exports), :meth:`finish` adds into that constant instead (as it is then: callers may have
    sliced it meanwhile), so no node is added.
    """

    def __init__(self, index: GraphIndex, store: WeightStore, new_name, constant=None) -> None:
        self.graph, self.store, self.new_name = index.graph, store, new_name
        self.constant = constant or (lambda name: store.array(name) if name in store else None)
        self.index = index
        self.readers = index.consumers
        self.added = 0
        self.after: dict[int, onnx.NodeProto] = {}  # Adds to insert, by the id of the node they follow
        self.pending: list[tuple[onnx.NodeProto, np.ndarray]] = []  # MatMul deltas: into its bias Add, else after

    def add(self, node: onnx.NodeProto, delta: np.ndarray) -> None:
        name = node.input[2] if len(node.input) > 2 else ""
        old = self.constant(name) if name else None
        if node.op_type == "MatMul":
            return self.pending.append((node, delta))
        if name and old is None:
            return self._add_after(node, delta)
        if node.op_type == "Gemm":
            beta = attribute(node, "beta", 1.0)
            if old is None or beta == 0:
                old, beta = None, 1.0
                _set_float_attribute(node, "beta", 1.0)
            delta = delta / beta
        value = delta if old is None else old + delta
        value = value.astype(delta.dtype)
        if name in self.store and len(self.readers.get(name, ())) <= 1:
            self.added += value.size - int(np.prod(self.store.tensor(name).dims, dtype=np.int64))
            self.store.set_array(name, value)
            return
        fresh = self.new_name(f"{name or node.name or node.op_type}_bias")
        self.store.add_initializer(fresh, value)
        self.added += value.size
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = fresh

    def _add_after(self, node: onnx.NodeProto, delta: np.ndarray) -> None:
        if node.op_type == "Conv":  # channels on axis 1: (C, 1, ..., 1)
            delta = delta.reshape(-1, *[1] * (len(self.store.tensor(node.input[1]).dims) - 2))
        output = node.output[0]
        node.output[0] = self.new_name(f"{output}_before_bias")
        bias = self.new_name(f"{output}_added_bias")
        self.store.add_initializer(bias, delta)
        self.added += delta.size
        self.after[id(node)] = onnx.helper.make_node("Add", [node.output[0], bias], [output],
                                                     name=self.new_name(f"{node.name or output}_bias"))

    def _bias_add_constant(self, node: onnx.NodeProto, size: int) -> str | None:
        """The constant of the bias Add that alone reads ``node``'s output, if only that Add reads it."""
        output = node.output[0]
        readers = self.readers.get(output, ())
        if len(readers) != 1 or output in self.index.output_names:
            return None
        add = self.index.nodes[readers[0]]
        if add.op_type != "Add" or add.domain not in STANDARD_DOMAINS or len(add.input) != 2:
            return None
        other = add.input[1] if add.input[0] == output else add.input[0]
        if other == output or other not in self.store or len(self.readers.get(other, ())) != 1:
            return None
        return other if tuple(self.store.tensor(other).dims) == (size,) else None

    def finish(self) -> None:
        for node, delta in self.pending:
            constant = self._bias_add_constant(node, delta.size)
            if constant is None:
                self._add_after(node, delta)
            else:
                self.store.set_array(constant, (self.store.array(constant) + delta).astype(delta.dtype))
        if self.after:
            replace_nodes(self.graph, (n for node in self.graph.node
                                       for n in (node, self.after.get(id(node))) if n is not None))


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


@dataclass(eq=False)
class PrunableTensor:
    """A weight tensor with every node using it (tied weights are pruned once, consistently).

    ``store`` and ``index`` are shared by every tensor of the same graph.
    """

    store: WeightStore
    index: GraphIndex
    name: str
    uses: list[WeightUse] = field(default_factory=list)
    top_level: bool = True

    @property
    def use(self) -> WeightUse:
        """The layout (identical for every use: tensors with conflicting layouts are not prunable)."""
        return self.uses[0]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.store.tensor(self.name).data_type))

    @property
    def size(self) -> int:
        """Elements, from the dims (the values stay where they are)."""
        return int(np.prod(self.store.tensor(self.name).dims, dtype=np.int64))

    def canonical(self, out: np.ndarray | None = None) -> np.ndarray:
        """The values as ``(out, ..., in)`` (``out``: a flat buffer to read external data into)."""
        return to_canonical(self.store.array(self.name, out), self.use)

    def canonical_view(self, flat: np.ndarray) -> np.ndarray:
        """``flat`` (the tensor's size) seen as the canonical view, in the same memory layout as :meth:`canonical`."""
        return to_canonical(flat.reshape(tuple(self.store.tensor(self.name).dims)), self.use)

    def write_canonical(self, array: np.ndarray) -> None:
        self.store.set_array(self.name, from_canonical(array, self.use))


def find_prunable(
    model: onnx.ModelProto,
    stats: dict[str, int | float],
    *,
    exclude: tuple[str, ...] = (),
    min_size: int = 0,
) -> list[PrunableTensor]:
    """Float weights of MatMul / Gemm / Conv in every graph, with the reason each other one is skipped.

    A weight is skipped when excluded by name (node or tensor, fnmatch patterns), smaller than
    ``min_size`` elements, read by a node that is not a prunable slot, or tied across nodes
    with different layouts.
    """
    found: list[PrunableTensor] = []
    for graph in walk_graphs(model.graph):
        store = WeightStore(graph)
        index = GraphIndex(graph)
        by_name: dict[str, PrunableTensor] = {}
        for node in graph.node:
            use = weight_use(node, store)
            if use is not None:
                by_name.setdefault(use.weight, PrunableTensor(store, index, use.weight,
                                                              top_level=graph is model.graph)).uses.append(use)
        for name, tensor in by_name.items():
            proto = store.tensor(name)
            size = int(np.prod(proto.dims, dtype=np.int64))
            readers = index.consumers.get(name, [])
            if proto.data_type not in FLOAT_TYPES:
                count(stats, "skipped_not_float")
            elif any(fnmatch.fnmatchcase(n, p) for p in exclude for n in (name, *(u.node.name for u in tensor.uses))):
                count(stats, "skipped_excluded")
            elif size < min_size:
                count(stats, "skipped_below_min_size")
            elif len(readers) != len(tensor.uses) or index.is_graph_output(name):
                count(stats, "skipped_weight_has_other_uses")
            elif len({u.layout for u in tensor.uses}) > 1:
                count(stats, "skipped_tied_layouts_differ")
            else:
                found.append(tensor)
    return found


def mean_contribution(canonical_delta: np.ndarray, input_mean: np.ndarray, groups: int = 1) -> np.ndarray:
    """``sum(delta * mean(x_in))`` per output channel (float64): the mean output change a weight change causes.

    ``canonical_delta`` is the change on the canonical ``(out, ..., in)`` view (see :func:`to_canonical`),
    ``input_mean`` the per-channel mean of the data input (grouped Conv aware, see :func:`per_input_channel`).
    Prune adds back what removed weights contributed; quantize subtracts the shift weight rounding causes.
    """
    delta = canonical_delta.astype(np.float64)
    return (delta * per_input_channel(delta.shape, input_mean, groups)).reshape(len(delta), -1).sum(axis=1)
