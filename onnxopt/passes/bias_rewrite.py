"""Rewriting a producer's weight and bias in place of the node after it: the machinery of fuse-bias and
fold-batchnorm, and the two rewrites themselves (quantize runs them before it quantizes).

:func:`fuse_bias` folds an Add of a per-channel constant into the Conv / Gemm / MatMul before it;
:func:`fold_batchnorm` folds an inference BatchNormalization into it (the pass modules say how).
Shared: :class:`GraphEdit` (reader counts, dead constant chains, one rebuild), :func:`rewrite_graph`
and :func:`run_per_graph` (one visit per node, outer graphs before their bodies),
:func:`producer_layout`, :func:`write_input` and :func:`value_ranks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph import (CONSTANT_FOLDABLE, STANDARD_DOMAINS, ConstantResolver, GraphIndex, WeightStore, filter_field, infer_shapes,
                     opset_version, replace_nodes, unique_name_factory, walk_graphs, walk_nodes)
from ..tensors import FLOAT_TYPES
from .base import count
from .weights import attribute

PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SWEEPABLE = frozenset(CONSTANT_FOLDABLE | {"Constant"})  # constant-chain ops removed once nobody reads them
GEMM_MIN_OPSET = 7  # unidirectional broadcast of Gemm's C

Rank = Callable[[str], "int | None"]


def run_per_graph(model: onnx.ModelProto, stats: dict[str, int | float], follower: str, rewrite) -> int:
    """Apply ``rewrite(graph, make_name, opset, stats, rank)`` to every graph, outer before inner
    (each body is reached after its enclosing graph was rebuilt); how many rewrites were made.

    Ranks come from one shape inference of the model, run before any change and only where a MatMul
    feeds a ``follower`` node (the one case that needs a rank).
    """
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        stats["skipped_ir_version_below_4"] = sum(n.op_type == follower for n in walk_nodes(model.graph))
        return 0
    ranks = value_ranks(model) if _matmul_feeds(model, follower) else None
    make_name = unique_name_factory(model)
    opset = opset_version(model)
    done = 0
    for position, graph in enumerate(walk_graphs(model.graph)):
        known = ranks[position] if ranks is not None and position < len(ranks) else declared_ranks(graph)
        done += rewrite(graph, make_name, opset, stats, known.get)
    return done


def fuse_bias(graph: onnx.GraphProto, make_name, opset: int, stats: dict[str, int | float] | None = None,
              rank: Rank | None = None) -> int:
    """Fuse Add-of-constant into the Conv / ConvTranspose / Gemm / MatMul before it, in one graph
    (its bodies are not entered); how many were fused. Skips are counted into ``stats``."""
    return rewrite_graph(graph, make_name, opset, stats, rank, "biases_fused", _visit_add)


@dataclass
class Rewrite:
    """What rewriting one graph needs, built once: indices, weights, constants, the pending edit."""

    index: GraphIndex
    store: WeightStore
    constants: ConstantResolver
    edit: GraphEdit
    make_name: Callable[[str], str]
    opset: int
    rank: Rank
    stats: dict[str, int | float]


def rewrite_graph(graph: onnx.GraphProto, make_name, opset: int, stats: dict[str, int | float] | None,
                  rank: Rank | None, counter: str, visit) -> int:
    """Offer every node, in topological order, to ``visit(node, position, rewrite)``: True when it
    rewrote, False when the node is not its pattern, else a skip reason (counted). The edit is
    applied once at the end; ``counter`` counts the rewrites. ``rank`` defaults to declared shapes."""
    stats = {} if stats is None else stats
    stats.setdefault(counter, 0)
    index, store = GraphIndex(graph), WeightStore(graph)
    rewrite = Rewrite(index, store, ConstantResolver(index, store, opset), GraphEdit(index), make_name, opset,
                      rank or declared_ranks(graph).get, stats)
    done = 0
    for i in index.topological_order():
        outcome = visit(index.nodes[i], i, rewrite)
        if outcome is True:
            done += 1
        elif outcome:
            count(stats, f"skipped_{outcome}")
    stats[counter] += done
    rewrite.edit.finish(stats)
    return done


def _visit_add(add: onnx.NodeProto, i: int, rw: Rewrite) -> bool | str:
    if add.op_type != "Add" or add.domain not in STANDARD_DOMAINS or len(add.input) != 2:
        return False
    found = _producer_side(add, rw.index, rw.edit, rw.constants)
    if found is None or isinstance(found, str):
        return found or False
    k, p, constant = found
    return _fuse(add, i, k, p, constant, rw.index, rw.store, rw.constants, rw.edit, rw.make_name, rw.opset,
                 rw.rank, rw.stats) or True


def _producer_side(add, index: GraphIndex, edit: GraphEdit, constants: ConstantResolver):
    """(operand position, producer position, constant) of an Add fed by a producer; a skip reason
    when no producer-fed operand has a constant other operand; None when no producer feeds it."""
    other = None
    for k in (0, 1):
        p = edit.producer(add.input[k])
        if p is None or p in edit.dropped:
            continue
        node = index.nodes[p]
        if node.op_type not in PRODUCERS or node.domain not in STANDARD_DOMAINS or node.output[0] != add.input[k]:
            continue
        value = constants.value(add.input[1 - k])
        if value is not None:
            return k, p, value
        other = other or add.input[1 - k]
    if other is None:
        return None
    return "outer_scope_constant" if constants.is_outer(other) else "runtime_operand"


def _fuse(add, i, k, p, constant: np.ndarray, index: GraphIndex, store: WeightStore, constants: ConstantResolver,
          edit: GraphEdit, make_name, opset: int, rank: Rank, stats) -> str | None:
    node = index.nodes[p]
    layout = sole_reader_layout(node, add.input[k], index, edit, constants, opset, rank)
    if isinstance(layout, str):
        return layout
    if constant.dtype != layout.dtype:
        return "dtype_mismatch"
    reason = per_channel_reason(constant.shape, layout.out_rank, layout.channels)
    if reason:
        return reason
    old = layout.bias_name
    old_value = constants.value(old) if old else None
    reason = bias_reason(old, old_value, layout.channels, constants)
    if reason:
        return reason
    delta = np.broadcast_to(constant.astype(np.float64).reshape(-1), (layout.channels,))
    if node.op_type == "Gemm":
        beta = float(attribute(node, "beta", 1.0))
        base = beta * old_value.astype(np.float64) if old_value is not None and beta != 0 else 0.0
        set_gemm_beta_one(node)
    else:  # Conv / ConvTranspose bias, or the C of a MatMul turned Gemm
        base = old_value.astype(np.float64) if old_value is not None else 0.0
    if node.op_type == "MatMul":
        node.op_type = "Gemm"
        count(stats, "matmuls_to_gemm")
    write_input(node, 2, (base + delta).astype(layout.dtype), store, edit, make_name,
                f"{node.name or node.output[0]}_bias")
    edit.take_over(p, add.output[0])
    edit.remove(i)
    return None


# --------------------------------------------------------------------------- shared with fold-batchnorm


@dataclass
class Layout:
    """What a fusion needs to know of a producer with a constant weight."""

    weight: str
    dtype: np.dtype
    channels: int           # output channels (on axis 1 of the output; the last axis for Gemm/MatMul)
    out_rank: int
    bias_name: str          # its bias input ("" when absent)


def sole_reader_layout(node: onnx.NodeProto, out: str, index: GraphIndex, edit: GraphEdit,
                       constants: ConstantResolver, opset: int, rank: Rank) -> Layout | str:
    """The producer's layout when the node after it may take over ``out`` (it is that output's one
    reader and no graph output reads it), or why not."""
    if index.is_graph_output(out):
        return "output_is_graph_output"
    if edit.readers(out) != 1:
        return "output_has_other_readers"
    return producer_layout(node, constants, opset, rank)


def producer_layout(node: onnx.NodeProto, constants: ConstantResolver, opset: int, rank: Rank) -> Layout | str:
    """The layout of a Conv / ConvTranspose / Gemm / MatMul whose weight is a float constant of
    this graph (initializer or Constant node), or why not.

    A MatMul qualifies when its input is 2-D (then it can become a Gemm, and its output channels
    are on axis 1 like the others').
    """
    if len(node.input) < 2 or not node.input[1]:
        return "dynamic_weight"
    weight, store = node.input[1], constants.store
    tensor = store.tensor(weight) if weight in store else None
    if tensor is None:
        return "outer_scope_weight" if constants.is_outer(weight) else "dynamic_weight"
    if tensor.data_type not in FLOAT_TYPES:
        return "not_float"
    dims = tuple(tensor.dims)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    bias = node.input[2] if len(node.input) > 2 else ""
    if node.op_type == "Conv":
        if len(dims) < 3:
            return "dynamic_weight"
        return Layout(weight, dtype, dims[0], len(dims), bias)
    if node.op_type == "ConvTranspose":
        if len(dims) < 3:
            return "dynamic_weight"
        return Layout(weight, dtype, dims[1] * int(attribute(node, "group", 1)), len(dims), bias)
    if len(dims) != 2:
        return "weight_not_2d"
    if opset < GEMM_MIN_OPSET:
        return "old_opset"
    if node.op_type == "Gemm":
        return Layout(weight, dtype, dims[0] if attribute(node, "transB", 0) else dims[1], 2, bias)
    if node.input[0] in store:
        return "dynamic_weight"  # constant @ runtime value: the weight is the first operand
    data_rank = rank(node.input[0])
    if data_rank is None:
        return "matmul_rank_unknown"
    if data_rank != 2:
        return "matmul_not_2d"
    return Layout(weight, dtype, dims[1], 2, "")


def per_channel_reason(shape: tuple[int, ...], out_rank: int, channels: int) -> str | None:
    """None when adding a constant of ``shape`` to an output of rank ``out_rank`` with ``channels`` on
    axis 1 adds one value per channel and leaves the output's shape as it is; else a skip reason."""
    if len(shape) > out_rank:
        return "broadcast_changes_shape"
    offset = out_rank - len(shape)
    for k, d in enumerate(shape):
        if d == 1:
            continue
        if offset + k != 1:
            return "not_per_channel"
        if d != channels:
            return "broadcast_changes_shape"
    return None


def bias_reason(name: str, value: np.ndarray | None, channels: int, constants: ConstantResolver) -> str | None:
    """Why a producer's bias input cannot take a per-channel sum (None: it can): computed at run
    time, or a Gemm C that varies along the batch axis only ([M, 1]), which would grow to [M, N]."""
    if name and value is None:
        return "outer_scope_bias" if constants.is_outer(name) else "runtime_bias"
    if value is not None and value.ndim == 2 and value.shape[1] == 1 and value.shape[0] > 1 and channels > 1:
        return "bias_would_grow"
    return None


def set_gemm_beta_one(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "beta":
            attr.f = 1.0


def write_input(node: onnx.NodeProto, position: int, value: np.ndarray, store: WeightStore, edit: GraphEdit,
                make_name, base: str) -> None:
    """Give a node's input ``position`` the constant ``value``: in place where only this node reads
    the constant there (initializer or Constant node), else as a new initializer (the old one released)."""
    name = node.input[position] if position < len(node.input) else ""
    if name and name in store and edit.readers(name) == 1 and not edit.index.is_graph_output(name):
        if tuple(store.tensor(name).dims) != value.shape:  # a Gemm C of shape [1] or () grows to [N]
            edit.gone.add(name)  # its value_info would state the old shape
        store.set_array(name, value)
        return
    fresh = make_name(base)
    store.add_initializer(fresh, value)
    edit.add_reader(fresh)
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = fresh
    if name:
        edit.release(name)


class GraphEdit:
    """Changes to one graph's node list, decided while rewriting and applied once in :meth:`finish`.

    Reader counts start from the index (built before any rewrite) and follow the edit. A removed
    node releases what it read; a constant chain (Constant, Reshape / Unsqueeze / ... nodes) whose
    last reader goes is removed with it, and so is an initializer no node reads any more. Graph
    inputs and outputs are never removed. Reads from inside bodies count (the index sees them).
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._readers: dict[str, int] = {}
        self.dropped: set[int] = set()
        self.dead_initializers: set[str] = set()
        self.gone: set[str] = set()  # value names nothing produces any more, or resized: their value_info goes
        self._taken: dict[str, int] = {}  # value name -> position of the node that produces it now
        self._initializers: set[str] | None = None

    def readers(self, name: str) -> int:
        return self._readers.get(name, len(self.index.consumers.get(name, ())))

    def add_reader(self, name: str) -> None:
        self._readers[name] = self.readers(name) + 1

    def producer(self, name: str) -> int | None:
        return self._taken.get(name, self.index.producer.get(name))

    def take_over(self, position: int, name: str) -> None:
        """The node at ``position`` writes ``name`` (the output of a node being removed) instead of its own output."""
        node = self.index.nodes[position]
        self.gone.add(node.output[0])
        node.output[0] = name
        self._taken[name] = position

    def remove(self, position: int) -> None:
        self._drop([position], [])

    def release(self, name: str) -> None:
        self._drop([], [name])

    def _drop(self, positions: list[int], names: list[str]) -> None:
        """Remove nodes and release reads, following dead constant chains with a worklist (no recursion)."""
        work = list(names)
        for position in positions:
            self.dropped.add(position)
            work.extend(dict.fromkeys(self.index.uses[position]))
        while work:
            name = work.pop()
            left = self.readers(name) - 1
            self._readers[name] = left
            if left > 0 or self.index.is_graph_output(name):
                continue
            p = self.index.producer.get(name)
            if p is None:
                if self._initializers is None:
                    inputs = {v.name for v in self.index.graph.input}
                    self._initializers = {t.name for t in self.index.graph.initializer if t.name not in inputs}
                if name in self._initializers:
                    self.dead_initializers.add(name)
                    self.gone.add(name)
                continue
            node = self.index.nodes[p]
            if p in self.dropped or node.op_type not in SWEEPABLE or node.domain not in STANDARD_DOMAINS:
                continue
            outputs = [o for o in node.output if o]
            if all(self.readers(o) <= 0 and not self.index.is_graph_output(o) for o in outputs):
                self.gone.update(outputs)
                self.dropped.add(p)
                work.extend(dict.fromkeys(self.index.uses[p]))

    def finish(self, stats: dict[str, int | float]) -> None:
        graph = self.index.graph
        if self.dropped:
            replace_nodes(graph, (n for i, n in enumerate(self.index.nodes) if i not in self.dropped))
            count(stats, "nodes_removed", len(self.dropped))
        if self.dead_initializers:
            count(stats, "initializers_removed",
                  filter_field(graph.initializer, lambda t: t.name not in self.dead_initializers))
        if self.gone and graph.value_info:
            filter_field(graph.value_info, lambda v: v.name not in self.gone)


def value_ranks(model: onnx.ModelProto) -> list[dict[str, int]]:
    """Known ranks of values per graph, in :func:`walk_graphs` order, from one shape inference
    (each graph's own values; a body's outer-scope references are unknown there)."""
    try:
        inferred = infer_shapes(model)
    except Exception:  # shape inference is a hint; without it, declared shapes only
        inferred = model
    return [declared_ranks(g) for g in walk_graphs(inferred.graph)]


def declared_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    ranks = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    ranks.update((t.name, len(t.dims)) for t in graph.initializer)
    return ranks


def _matmul_feeds(model: onnx.ModelProto, follower: str) -> bool:
    """Whether some MatMul output is read by a ``follower`` node (in the same graph)."""
    for graph in walk_graphs(model.graph):
        outputs = {n.output[0] for n in graph.node if n.op_type == "MatMul" and n.output}
        if outputs and any(n.op_type == follower and any(i in outputs for i in n.input) for n in graph.node):
            return True
    return False


def fold_batchnorm(graph: onnx.GraphProto, make_name, opset: int, stats: dict[str, int | float] | None = None,
                   rank: Rank | None = None) -> int:
    """Fold every foldable BatchNormalization of one graph (its bodies are not entered) into its
    producer; how many were folded. Skips are counted into ``stats`` as ``skipped_<reason>``.

    ``rank`` gives value ranks (a MatMul qualifies only with 2-D input); default: declared shapes.
    """
    return rewrite_graph(graph, make_name, opset, stats, rank, "batchnorms_folded", _visit_batchnorm)


def _visit_batchnorm(bn: onnx.NodeProto, i: int, rw: Rewrite) -> bool | str:
    if bn.op_type != "BatchNormalization" or bn.domain not in STANDARD_DOMAINS:
        return False
    return _fold(bn, i, rw.index, rw.store, rw.constants, rw.edit, rw.make_name, rw.opset, rw.rank, rw.stats) or True


def _fold(bn: onnx.NodeProto, i: int, index: GraphIndex, store: WeightStore, constants: ConstantResolver,
          edit: GraphEdit, make_name, opset: int, rank: Rank, stats) -> str | None:
    if any(bn.output[1:]) or attribute(bn, "training_mode", 0):
        return "training_mode"
    if attribute(bn, "spatial", 1) == 0:
        return "not_spatial"
    if len(bn.input) != 5:
        return "malformed"
    p = edit.producer(bn.input[0])
    node = index.nodes[p] if p is not None and p not in edit.dropped else None
    if (node is None or node.op_type not in PRODUCERS or node.domain not in STANDARD_DOMAINS
            or node.output[0] != bn.input[0]):
        return "no_foldable_producer"
    layout = sole_reader_layout(node, bn.input[0], index, edit, constants, opset, rank)
    if isinstance(layout, str):
        return layout
    if edit.readers(layout.weight) != 1 or index.is_graph_output(layout.weight):
        return "shared_weight"
    params = [constants.value(n) for n in bn.input[1:5]]
    if any(x is None for x in params):
        return "outer_scope_parameters" if any(constants.is_outer(n) for n in bn.input[1:5]) else "runtime_parameters"
    if any(x.shape != (layout.channels,) for x in params):
        return "parameter_shape"
    old = layout.bias_name
    old_value = constants.value(old) if old else None
    reason = bias_reason(old, old_value, layout.channels, constants)
    if reason:
        return reason
    gamma, beta, mean, var = (x.astype(np.float64) for x in params)
    with np.errstate(all="ignore"):
        factor = gamma / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
    if not np.isfinite(factor).all():
        return "nonfinite_scale"
    if node.op_type == "Gemm":
        gemm_beta = float(attribute(node, "beta", 1.0))
        base = gemm_beta * old_value.astype(np.float64) if old_value is not None and gemm_beta != 0 else 0.0
        set_gemm_beta_one(node)
    else:
        base = old_value.astype(np.float64) if old_value is not None else 0.0
    store.set_array(layout.weight, _scaled_weight(node, layout, store.array(layout.weight), factor))
    if node.op_type == "MatMul":
        node.op_type = "Gemm"
        count(stats, "matmuls_to_gemm")
    bias = (base - mean) * factor + beta
    write_input(node, 2, bias.astype(layout.dtype), store, edit, make_name, f"{node.name or node.output[0]}_bias")
    edit.take_over(p, bn.output[0])
    edit.remove(i)
    return None


def _scaled_weight(node: onnx.NodeProto, layout: Layout, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """The weight with output channel ``c`` scaled by ``factor[c]`` (float64, back in the weight's dtype)."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        w = w * factor.reshape(-1, *[1] * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":  # (C_in, C_out / group, k...): group g writes channels g*(C_out/group) + j
        groups = int(attribute(node, "group", 1))
        per_group = w.shape[1]
        shaped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        w = (shaped * factor.reshape(groups, 1, per_group, *[1] * (w.ndim - 2))).reshape(w.shape)
    elif node.op_type == "Gemm" and attribute(node, "transB", 0):
        w = w * factor[:, None]
    else:  # Gemm (K, N) or MatMul (K, N)
        w = w * factor[None, :]
    return w.astype(layout.dtype)


# --------------------------------------------------------------------------- LayerNorm beta into the layers after it


def fold_norm_bias(graph: onnx.GraphProto, make_name, opset: int, stats: dict[str, int | float] | None = None,
                   rank: Rank | None = None) -> int:
    """Fold the beta of every LayerNormalization whose output only MatMul / Gemm layers with a constant weight
    and a bias read into those biases: (x̂γ + β) W + b = x̂γ W + (βW + b), exact in real arithmetic (one
    graph, its bodies not entered; how many were folded). The norm loses its optional bias input, and the
    file a float vector per norm; quantize runs it first, so that the int8 weight no longer carries β's
    product (it is added in float) and calibration sees the tensor the layers will read."""
    return rewrite_graph(graph, make_name, opset, stats, rank, "norm_biases_folded", _visit_layernorm)


def _visit_layernorm(norm: onnx.NodeProto, i: int, rw: Rewrite) -> bool | str:
    if (norm.op_type != "LayerNormalization" or norm.domain not in STANDARD_DOMAINS or len(norm.input) < 3
            or not norm.input[2]):
        return False
    out = norm.output[0]
    beta = rw.constants.value(norm.input[2])
    if beta is None:
        return "runtime_norm_bias"
    if beta.ndim != 1 or beta.dtype.kind != "f":
        return "norm_bias_shape"
    axis, rank = int(attribute(norm, "axis", -1)), rw.rank(out)
    if axis != -1 and (rank is None or axis != rank - 1):
        return "norm_not_last_axis"
    if rw.index.is_graph_output(out) or not rw.index.consumer_nodes(out):
        return "norm_output_is_graph_output"
    targets = []
    for reader in rw.index.consumer_nodes(out):
        target = _bias_target(reader, out, beta, rw)
        if isinstance(target, str):
            return target
        targets.append(target)
    for node, position, weight_kn, old in targets:
        delta = beta.astype(np.float64) @ weight_kn.astype(np.float64)
        write_input(node, position, (old.astype(np.float64) + delta).astype(old.dtype), rw.store, rw.edit,
                    rw.make_name, f"{node.name or node.output[0]}_bias")
    rw.edit.release(norm.input[2])
    del norm.input[2]
    return True


def _bias_target(reader: onnx.NodeProto, out: str, beta: np.ndarray, rw: Rewrite
                 ) -> tuple[onnx.NodeProto, int, np.ndarray, np.ndarray] | str:
    """Where a reader of a LayerNorm output adds its bias: (node, input position, weight as [K, N], bias [N]),
    for ``x @ W (+ Add b)`` and ``Gemm(x, W, b)`` with W a float constant; else why not."""
    if reader.op_type not in ("MatMul", "Gemm") or reader.domain not in STANDARD_DOMAINS or reader.input[0] != out:
        return "norm_read_by_other_op"
    weight = rw.constants.value(reader.input[1]) if len(reader.input) > 1 and reader.input[1] != out else None
    if weight is None or weight.ndim != 2 or weight.dtype != beta.dtype:
        return "norm_read_by_dynamic_weight"
    if reader.op_type == "Gemm":
        if attribute(reader, "transA", 0) or attribute(reader, "alpha", 1.0) != 1.0 or attribute(reader, "beta", 1.0) != 1.0:
            return "norm_read_by_scaled_gemm"
        weight_kn = weight.T if attribute(reader, "transB", 0) else weight
        node, position = reader, 2
        bias = rw.constants.value(reader.input[2]) if len(reader.input) > 2 and reader.input[2] else None
    else:
        weight_kn = weight
        after = rw.index.consumer_nodes(reader.output[0])
        if len(after) != 1 or after[0].op_type != "Add" or rw.index.is_graph_output(reader.output[0]):
            return "norm_read_by_layer_without_bias"
        node = after[0]
        position = 1 if node.input[0] == reader.output[0] else 0
        bias = rw.constants.value(node.input[position])
    if weight_kn.shape[0] != beta.size or bias is None or bias.shape != (weight_kn.shape[1],) or bias.dtype != beta.dtype:
        return "norm_read_by_layer_without_bias"
    return node, position, weight_kn, bias
