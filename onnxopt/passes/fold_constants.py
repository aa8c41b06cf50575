"""fold-constants: compute ahead of time every value that no graph input can change (as onnx-simplifier does).

A node folds when everything it reads is constant: an initializer that is not also a graph input
(those can be overridden at run time), a Constant node, an empty optional input, or the output of
a node folded before it. ``Shape`` and ``Size`` fold when their input's shape is static, and a
``Gather``/``Slice`` of a ``Shape`` folds when it picks only static dims, so a symbolic batch dim
blocks only the part of a shape computation that reads it. Static shapes come from one shape
inference of the main graph per round; a round that folded something and left a Shape/Size
unresolved is followed by another (what it folded may make that shape static), so a second run
finds nothing. Inside If/Loop/Scan bodies only constant values fold (shapes there may change from
one iteration to the next).

Each node is evaluated alone by the ONNX reference evaluator, after onnx's shape inference of that
node on its actual constant inputs: the inferred shape bounds the output size before anything is
computed (``max_bytes``), and a result must have the inferred dtype and shape or it is not used.

Folding never trades nodes for weight bytes: folded nodes joined by the values they pass form one
computation, and one that would store more bytes than it frees (beyond GROWTH_ALLOWANCE for shape
vectors and scalars) is left as it was and counted (``skipped_grows_weights``): say a reshuffle of a
weight that other nodes still read, or a ConstantOfShape that expands a shape into a big tensor.

A folded value becomes an initializer of the same name; it becomes a Constant node instead where
it is a graph output (the interface stays as it was) or where IR < 4 requires every initializer to
be a graph input; it is not folded there when the opset's Constant cannot hold its type (before
opset 9: anything but float16, float, double). Folded values that only other folded nodes read are
dropped, and so are the constants and nodes that only folded nodes read; other dead code is left to
``dce``. If/Loop/Scan nodes themselves are not evaluated, but their bodies are folded, reading
constants of the enclosing graphs.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..data import input_dims
from ..errors import InputError
from ..graph import (STANDARD_DOMAINS, GraphIndex, NodeEvaluationError, WeightStore, constant_tensor, defined_names,
                     evaluate_node, filter_field, is_nondeterministic, node_subgraphs, node_uses, opset_version,
                     rename_values, replace_nodes, shadows_outer_names, unique_name_factory, value_shapes, walk_graphs,
                     walk_nodes)
from ..modelio import EXTERNAL_THRESHOLD, has_external_data
from ..tensors import is_external, set_tensor_array, tensor_nbytes, tensor_to_array
from .base import Pass, PassResult, count

# DequantizeLinear of a constant is how QDQ models store quantized weights: folding would turn them
# back into float (4x the bytes) and hide the pattern runtimes fuse into quantized kernels.
KEPT_OPS = frozenset({"DequantizeLinear"})
SHAPE_PICKERS = frozenset({"Gather", "Slice"})  # ops that select entries of a shape vector
INFERENCE_DATA_BYTES = 4096  # constant inputs up to this size are shown to shape inference (shape-like values)
GROWTH_ALLOWANCE = 1024  # bytes a folded computation may add beyond what it frees (shape vectors, scalars)
_COUNTERS = ("nodes_folded", "shape_nodes_folded", "initializers_added", "constant_nodes_added", "nodes_removed",
             "initializers_removed", "ifs_inlined")  # summed over rounds


class FoldConstants(Pass):
    name = "fold-constants"
    summary = "precompute nodes that depend on no graph input (static Shape/Size included) as initializers"
    exact = True

    @dataclass(frozen=True)
    class Options:
        max_bytes: int = 1 << 20  # a node whose outputs exceed this and its constant inputs together stays

        def __post_init__(self) -> None:
            if self.max_bytes < 0:
                raise InputError(f"fold-constants: max_bytes must be >= 0, not {self.max_bytes}")

    def run(self, model: onnx.ModelProto) -> PassResult:
        totals = dict.fromkeys(_COUNTERS, 0)
        while True:
            folder = _Folder(model, self.options.max_bytes, dict.fromkeys(_COUNTERS, 0))
            folder.fold(model.graph, None)
            folder.stats["ifs_inlined"] = inline_constant_ifs(model, folder.stats)
            for key in _COUNTERS:
                totals[key] += folder.stats[key]
            # Static shapes come from one inference of the model as the round found it: values folded
            # since (Split lengths, Pad pads) may make a Shape left unresolved static in the next round;
            # an inlined branch brings nodes that may fold in the next.
            if not (folder.stats["nodes_folded"] and folder.shapes_unresolved or folder.stats["ifs_inlined"]):
                break
        modified = totals["nodes_folded"] > 0 or totals["ifs_inlined"] > 0
        return PassResult(model, modified, {**folder.stats, **totals})  # skips: the last round's


class _Scope:
    """Constant values visible in one graph: its own first, then those of the enclosing graphs."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None) -> None:
        overridable = {i.name for i in graph.input}
        self.tensors = {t.name: t for t in graph.initializer if t.name not in overridable}
        for node in graph.node:
            tensor = constant_tensor(node)
            if tensor is not None:
                self.tensors[node.output[0]] = tensor
        self.folded: dict[str, np.ndarray] = {}
        self.local = defined_names(graph)  # a local non-constant hides an outer constant of the same name
        self.outputs = {o.name for o in graph.output}
        self.outer = outer

    def holder(self, name: str) -> _Scope | None:
        if name in self.folded or name in self.tensors:
            return self
        if name in self.local or self.outer is None:
            return None
        return self.outer.holder(name)

    def is_constant(self, name: str) -> bool:
        return not name or self.holder(name) is not None

    def value(self, name: str) -> onnx.TensorProto | np.ndarray:
        scope = self.holder(name)
        return scope.folded[name] if name in scope.folded else scope.tensors[name]

    def array(self, name: str) -> np.ndarray:
        found = self.value(name)
        return found if isinstance(found, np.ndarray) else tensor_to_array(found)

    def nbytes(self, name: str) -> int:
        found = self.value(name)
        return found.nbytes if isinstance(found, np.ndarray) else tensor_nbytes(found)

    def dims(self, name: str) -> tuple[int, ...]:
        found = self.value(name)
        return found.shape if isinstance(found, np.ndarray) else tuple(found.dims)

    def type_proto(self, name: str) -> onnx.TypeProto:
        found = self.value(name)
        if isinstance(found, np.ndarray):
            return helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(found.dtype), found.shape)
        return helper.make_tensor_type_proto(found.data_type, found.dims)

    def inference_data(self, name: str) -> onnx.TensorProto | None:
        """The value as shape inference takes it, when small and in memory (shapes, axes, repeats...)."""
        found = self.value(name)
        if isinstance(found, np.ndarray):
            return numpy_helper.from_array(found, name) if found.nbytes <= INFERENCE_DATA_BYTES else None
        if is_external(found) or tensor_nbytes(found) > INFERENCE_DATA_BYTES:
            return None
        return found


class _Folder:
    """One pass over a model: settings, counters and the main graph's static shapes, shared by all graphs."""

    def __init__(self, model: onnx.ModelProto, max_bytes: int, stats: dict[str, int | float]) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.stats = stats
        self.opset = opset_version(model)
        self.constant_nodes_only = model.ir_version < 4  # before IR 4 every initializer must be a graph input
        self.spill = has_external_data(model)  # keep big folded tensors out of memory like the weights they come from
        self._shapes: dict[str, tuple] | None = None
        self.shapes_unresolved = False  # a main-graph Shape/Size read dims that inference did not know
        self._names = None
        self._readers: Counter | None = None

    def fold(self, graph: onnx.GraphProto, outer: _Scope | None) -> set[str]:
        """Fold one graph and its bodies; return the outer names that folded nodes no longer read."""
        scope = _Scope(graph, outer)
        index = GraphIndex(graph)
        partial_shapes: dict[str, tuple[int | None, ...]] = {}
        folded: set[int] = set()
        for i in index.topological_order():
            values = self._fold_node(index.nodes[i], index.uses[i], scope, partial_shapes, is_main=outer is None)
            if values is not None:
                scope.folded.update(values)
                folded.add(i)
        folded = self._paying(index, folded, scope)
        self.stats["nodes_folded"] += len(folded)
        kept = [node for i, node in enumerate(index.nodes) if i not in folded]
        released = {name for i in folded for name in index.uses[i]}
        for node in kept:
            for body in node_subgraphs(node):
                count(self.stats, "subgraphs_visited")
                released |= self.fold(body, scope)
        if not folded and not released:
            return set()
        folded_by = {out: index.nodes[i] for i in folded for out in index.nodes[i].output if out}
        return self._rewrite(graph, scope, kept, released, folded_by)

    # ----------------------------------------------------------------------- deciding and evaluating

    def _paying(self, index: GraphIndex, folded: set[int], scope: _Scope) -> set[int]:
        """The folded nodes whose computations pay for themselves in weight bytes.

        Folded nodes joined by the values they pass form one computation. It writes the values that
        kept nodes or graph outputs read, and frees the constants that only it reads (anywhere in the
        model). One that writes more than it frees, beyond GROWTH_ALLOWANCE (shape vectors, scalars),
        is left as it was: a reshuffle of a weight that stays referenced elsewhere (an LSTM's gate
        reordering in both branches of an If) would otherwise store the weight twice.
        """
        if not folded:
            return folded
        group = {i: i for i in folded}

        def root(i: int) -> int:
            while group[i] != i:
                group[i] = group[group[i]]
                i = group[i]
            return i

        for i in folded:
            for name in index.nodes[i].input:
                j = index.producer.get(name)
                if j in folded:
                    group[root(i)] = root(j)
        members: dict[int, list[int]] = {}
        for i in folded:
            members.setdefault(root(i), []).append(i)
        needed = {name for i, uses in enumerate(index.uses) if i not in folded for name in uses} | scope.outputs
        readers = self._model_readers()
        declined: set[int] = set()
        for nodes in members.values():
            produced = {out for i in nodes for out in index.nodes[i].output if out}
            written = sum(scope.folded[name].nbytes for name in produced if name in needed)
            reads = Counter(name for i in nodes for name in set(index.nodes[i].input) if name and name not in produced)
            freed = sum(scope.nbytes(name) for name, n in reads.items()
                        if scope.is_constant(name) and readers[name] == n)
            if written > freed + GROWTH_ALLOWANCE:
                declined.update(nodes)
                for name in produced:
                    scope.folded.pop(name, None)
        if declined:
            count(self.stats, "skipped_grows_weights", len(declined))
        return folded - declined

    def _model_readers(self) -> Counter:
        """How many nodes read each name, in every graph (graph outputs count as readers)."""
        if self._readers is None:
            self._readers = Counter()
            for graph in walk_graphs(self.model.graph):
                for node in graph.node:
                    self._readers.update(set(name for name in node.input if name))
                self._readers.update(o.name for o in graph.output)
        return self._readers

    def _fold_node(self, node: onnx.NodeProto, uses: list[str], scope: _Scope,
                   partial_shapes: dict[str, tuple[int | None, ...]], is_main: bool) -> dict[str, np.ndarray] | None:
        standard = node.domain in STANDARD_DOMAINS
        if standard and node.op_type in ("Shape", "Size") and not scope.is_constant(node.input[0]):
            return self._fold_shape(node, scope, partial_shapes) if is_main else None
        if standard and node.op_type in SHAPE_PICKERS and node.input[0] in partial_shapes:
            return self._pick_dims(node, scope, partial_shapes)
        if not all(scope.is_constant(name) for name in uses):
            return None
        if standard and node.op_type == "Constant":
            return None  # already a constant
        if standard and node.op_type in ("Shape", "Size"):
            return self._shape_values(node, scope, scope.dims(node.input[0]), partial_shapes)
        reason = _blocker(node, standard, self.opset)
        if reason:
            count(self.stats, f"skipped_{reason}")
            return None
        return self._evaluate(node, scope)

    def _evaluate(self, node: onnx.NodeProto, scope: _Scope) -> dict[str, np.ndarray] | None:
        inputs = list(dict.fromkeys(name for name in node.input if name))
        input_bytes = sum(scope.nbytes(name) for name in inputs)
        types = self._infer(node, scope, inputs)
        if types is None:
            return None
        outputs = [name for name in node.output if name]
        if any(not types.get(name, onnx.TypeProto()).HasField("tensor_type") for name in outputs):
            count(self.stats, "skipped_non_tensor_output")
            return None
        if not all(self._storable(scope, name, types[name].tensor_type.elem_type) for name in outputs):
            return None
        expected = [_static_dims(types[name]) for name in outputs]
        if all(dims is not None and None not in dims for dims in expected):
            predicted = sum(_nbytes(dims, types[name].tensor_type.elem_type) for dims, name in zip(expected, outputs))
            if self._too_large(predicted, input_bytes):
                return None
        elif input_bytes > self.max_bytes:  # do not read big constants for an output of unknown size
            count(self.stats, "skipped_unknown_size")
            return None
        results = self._run(node, {name: scope.array(name) for name in inputs})
        if results is None:
            return None
        values: dict[str, np.ndarray] = {}
        for name, result in zip(node.output, results):
            if name:
                problem = _mismatch(result, types[name])
                if problem:
                    count(self.stats, f"skipped_{problem}")
                    return None
                values[name] = result
        if len(values) < len(outputs):
            count(self.stats, "skipped_evaluation_error")
            return None
        if self._too_large(sum(v.nbytes for v in values.values()), input_bytes):
            return None
        return values

    def _storable(self, scope: _Scope, name: str, elem_type: int) -> bool:
        """Whether a folded value can be written: one that becomes a Constant node (a graph output, or any
        before IR 4) needs a type the opset's Constant holds (before opset 9: float16, float, double)."""
        if not (self.constant_nodes_only or name in scope.outputs) or elem_type in _constant_node_types(self.opset):
            return True
        count(self.stats, "skipped_constant_type")
        return False

    def _too_large(self, output_bytes: int, input_bytes: int) -> bool:
        """Folding may not grow the model by more than ``max_bytes`` per node (Expand, Tile, ConstantOfShape...)."""
        if output_bytes > self.max_bytes and output_bytes > input_bytes:
            count(self.stats, "skipped_too_large")
            return True
        return False

    def _infer(self, node: onnx.NodeProto, scope: _Scope, inputs: list[str]) -> dict[str, onnx.TypeProto] | None:
        """Output types from the op's own shape inference, with small constant inputs as data."""
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
        except onnx.defs.SchemaError:
            count(self.stats, f"skipped_unsupported_{node.op_type}")
            return None
        data = {name: scope.inference_data(name) for name in inputs}
        try:
            return onnx.shape_inference.infer_node_outputs(
                schema, node, {name: scope.type_proto(name) for name in inputs},
                {name: tensor for name, tensor in data.items() if tensor is not None},
                opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        except Exception:  # the node is invalid on these inputs: leave it for the runtime to report
            count(self.stats, "skipped_inference_error")
            return None

    def _run(self, node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list | None:
        try:
            return evaluate_node(node, feeds, self.opset)
        except NodeEvaluationError as exc:
            count(self.stats, f"skipped_{exc.reason}")
            return None

    # ----------------------------------------------------------------------- static shapes

    def _fold_shape(self, node: onnx.NodeProto, scope: _Scope, partial_shapes: dict) -> dict[str, np.ndarray] | None:
        if self._shapes is None:  # one shape inference per pass, only if a Shape/Size needs it
            self._shapes = value_shapes(self.model)
            # an initializer that is also an input may be fed with another shape: only its declaration counts
            declared = {v.name: input_dims(v) for v in self.model.graph.input}
            for init in self.model.graph.initializer:
                if init.name in declared:
                    self._shapes[init.name] = declared[init.name]
        dims = self._shapes.get(node.input[0])
        values = None if dims is None else self._shape_values(node, scope, dims, partial_shapes)
        self.shapes_unresolved |= values is None
        return values

    def _shape_values(self, node: onnx.NodeProto, scope: _Scope, dims: Iterable,
                      partial_shapes: dict) -> dict[str, np.ndarray] | None:
        """Shape/Size of known dims; a Shape with some unknown dims is remembered for Gather/Slice."""
        known = tuple(d if isinstance(d, int) and d >= 0 else None for d in dims)  # -1 and names: dynamic
        if node.op_type == "Size":
            if None in known:
                return None
            values = {node.output[0]: np.array(int(np.prod(known, dtype=np.int64)), dtype=np.int64)}
        else:
            attrs = {a.name: a.i for a in node.attribute}
            picked = known[attrs.get("start", 0):attrs.get("end", len(known))]  # ONNX clamps like Python slices
            if None in picked:
                if any(d is not None for d in picked):
                    partial_shapes[node.output[0]] = picked
                return None
            values = {node.output[0]: np.array(picked, dtype=np.int64)}
        if not self._storable(scope, node.output[0], onnx.TensorProto.INT64):
            return None
        count(self.stats, "shape_nodes_folded")
        return values

    def _pick_dims(self, node: onnx.NodeProto, scope: _Scope, partial_shapes: dict) -> dict[str, np.ndarray] | None:
        """Gather/Slice of a partly known shape: run the node on dim positions, fold if it picks known dims only."""
        if not all(scope.is_constant(name) for name in node.input[1:]):
            return None
        dims = partial_shapes[node.input[0]]
        feeds = {name: scope.array(name) for name in node.input[1:] if name}
        feeds[node.input[0]] = np.arange(len(dims), dtype=np.int64)
        results = self._run(node, feeds)
        if results is None:
            return None
        positions = results[0]
        picked = [dims[p] for p in positions.reshape(-1)]
        if None in picked:
            if positions.ndim == 1 and any(d is not None for d in picked):
                partial_shapes[node.output[0]] = tuple(picked)
            return None
        if not self._storable(scope, node.output[0], onnx.TensorProto.INT64):
            return None
        count(self.stats, "shape_nodes_folded")
        return {node.output[0]: np.array(picked, dtype=np.int64).reshape(positions.shape)}

    # ----------------------------------------------------------------------- rewriting

    def _rewrite(self, graph: onnx.GraphProto, scope: _Scope, kept: list[onnx.NodeProto], released: set[str],
                 folded_by: dict[str, onnx.NodeProto]) -> set[str]:
        """Emit folded values something still reads; drop what only folded nodes read; rebuild lists once."""
        kept_uses = [list(dict.fromkeys(node_uses(node))) for node in kept]  # after bodies were folded
        readers = Counter(name for uses in kept_uses for name in uses)
        readers.update(o.name for o in graph.output)
        producer = {out: j for j, node in enumerate(kept) for out in node.output if out}
        removable = {t.name for t in graph.initializer} - {i.name for i in graph.input}
        dead_nodes: set[int] = set()
        dead_initializers: set[str] = set()
        outer_released: set[str] = set()
        stack = list(released)
        while stack:
            name = stack.pop()
            if readers[name] > 0 or name in dead_initializers:
                continue
            if name not in scope.local:
                outer_released.add(name)
            elif name in removable:
                dead_initializers.add(name)
            elif name in producer and producer[name] not in dead_nodes:
                j = producer[name]
                if not any(readers[out] for out in kept[j].output if out):
                    dead_nodes.add(j)
                    for use in kept_uses[j]:
                        readers[use] -= 1
                        stack.append(use)

        outputs = {o.name for o in graph.output}
        initializers, constants = [], []
        for name, array in scope.folded.items():
            if readers[name] <= 0:
                continue
            tensor = self._tensor(name, array)
            if name in outputs or self.constant_nodes_only:
                constants.append(helper.make_node("Constant", [], [name], name=self._node_name(folded_by, name),
                                                  value=tensor))
            else:
                initializers.append(tensor)
        replace_nodes(graph, [*constants, *(node for j, node in enumerate(kept) if j not in dead_nodes)])
        if dead_initializers:
            filter_field(graph.initializer, lambda t: t.name not in dead_initializers)
        graph.initializer.extend(initializers)
        gone = {name for name in scope.folded if readers[name] <= 0} | dead_initializers
        gone.update(out for j in dead_nodes for out in kept[j].output)
        if graph.value_info:
            filter_field(graph.value_info, lambda v: v.name not in gone)
        self.stats["initializers_added"] += len(initializers)
        self.stats["constant_nodes_added"] += len(constants)
        self.stats["nodes_removed"] += len(dead_nodes)
        self.stats["initializers_removed"] += len(dead_initializers)
        return outer_released

    def _tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if self.spill and array.nbytes >= EXTERNAL_THRESHOLD and array.dtype != object:  # strings stay inline
            tensor = onnx.TensorProto(name=name, data_location=onnx.TensorProto.EXTERNAL)
            set_tensor_array(tensor, array)
            return tensor
        return numpy_helper.from_array(np.require(array, requirements="C"), name)

    def _node_name(self, folded_by: dict[str, onnx.NodeProto], output: str) -> str:
        if self._names is None:
            self._names = unique_name_factory(self.model)
        return self._names((folded_by[output].name or output) + "_folded")


def _blocker(node: onnx.NodeProto, standard: bool, opset: int) -> str | None:
    """Why a node with constant inputs still may not be folded, if it may not."""
    if not standard:
        return "custom_domain"
    if is_nondeterministic(node, opset):
        return "nondeterministic"
    if node.op_type in KEPT_OPS:
        return node.op_type
    if next(node_subgraphs(node), None) is not None:
        return "control_flow"
    return None


@functools.cache
def _constant_node_types(opset: int) -> frozenset[int]:
    """Element types a Constant node may hold at this opset, from its schema."""
    allowed = set(onnx.defs.get_schema("Constant", opset, "").type_constraints[0].allowed_type_strs)
    return frozenset(t for t in onnx.TensorProto.DataType.values()
                     if f"tensor({onnx.TensorProto.DataType.Name(t).lower()})" in allowed)


def _mismatch(result, type_proto: onnx.TypeProto) -> str | None:
    """Why an evaluated output cannot stand for the node's output (the reference broke the op's type rules)."""
    elem_type = type_proto.tensor_type.elem_type
    dtype = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else None
    if not isinstance(result, np.ndarray) or result.dtype != dtype:
        return "dtype_mismatch"
    dims = _static_dims(type_proto)
    if dims is not None and (len(dims) != result.ndim or any(d not in (None, r) for d, r in zip(dims, result.shape))):
        return "shape_mismatch"
    return None


def _static_dims(type_proto: onnx.TypeProto) -> tuple[int | None, ...] | None:
    """Dims of an inferred tensor type (None where unknown), or None when even the rank is unknown."""
    tensor = type_proto.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def _nbytes(dims: tuple[int, ...], elem_type: int) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize if elem_type else 8
    return int(np.prod(dims, dtype=np.int64)) * itemsize


# --------------------------------------------------------------------------- constant conditions


def inline_constant_ifs(model: onnx.ModelProto, stats: dict[str, int | float]) -> int:
    """Replace each If whose condition is a constant of its own graph by the branch it takes.

    The branch's values get fresh names (its outputs take the If's), its initializers move out, and
    reads of them inside nested bodies follow. Models whose bodies shadow outer names are left alone.
    A branch may hold a more exact shape than the If declared (a [1] where a consumer wants a scalar):
    if strict shape inference then fails, every graph is put back as it was (``skipped_if_inline_invalid``).
    """
    if not any(n.op_type == "If" for n in walk_nodes(model.graph)) or shadows_outer_names(model.graph):
        return 0
    make_name = unique_name_factory(model)
    inlined = 0
    before: list[tuple[onnx.GraphProto, list[onnx.NodeProto], int]] = []
    for graph in list(walk_graphs(model.graph)):
        if not any(n.op_type == "If" for n in graph.node):
            continue
        store = WeightStore(graph)
        nodes: list[onnx.NodeProto] = []
        saved = None  # the graph as it was, copied before its first inlining
        for node in graph.node:
            taken = _taken_branch(node, store)
            if taken is None:
                nodes.append(node)
                continue
            saved = saved or (graph, [_copy(n) for n in graph.node], len(graph.initializer))
            nodes.extend(_inline(taken, node, graph, make_name))
            inlined += 1
        if saved:
            before.append(saved)
            replace_nodes(graph, nodes)
    if inlined and not _infers_strictly(model):
        for graph, nodes, initializers in before:
            replace_nodes(graph, nodes)
            del graph.initializer[initializers:]
        count(stats, "skipped_if_inline_invalid", inlined)
        return 0
    return inlined


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _infers_strictly(model: onnx.ModelProto) -> bool:
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception:  # shape inference raises several types
        return False
    return True


def _taken_branch(node: onnx.NodeProto, store: WeightStore) -> onnx.GraphProto | None:
    if node.op_type != "If" or node.domain not in STANDARD_DOMAINS or node.input[0] not in store:
        return None
    cond = store.array(node.input[0])
    if cond is None or cond.size != 1:
        return None
    branch = next((a.g for a in node.attribute if a.name == ("then_branch" if cond.reshape(-1)[0] else "else_branch")),
                  None)
    if branch is None or branch.sparse_initializer or len(branch.output) != len(node.output):
        return None
    return branch


def _inline(branch: onnx.GraphProto, node: onnx.NodeProto, graph: onnx.GraphProto, make_name) -> list[onnx.NodeProto]:
    """The branch's nodes, renamed into ``graph``: its outputs become the If's outputs."""
    rename = {name: make_name(name) for name in defined_names(branch)}
    outputs = {}
    bridges = []
    for produced, wanted in zip(branch.output, node.output):
        source = rename.get(produced.name, produced.name)
        defined_by_node = any(produced.name in n.output for n in branch.node)
        if defined_by_node and produced.name not in outputs.values() and wanted:
            outputs[wanted] = produced.name
            rename[produced.name] = wanted
        elif wanted:  # an outer value, a branch initializer, or one value feeding two outputs
            bridges.append((source, wanted))
    inlined = []
    for inner in branch.node:
        copy = _copy(inner)
        rename_values(copy.input, lambda name: rename.get(name, name))
        rename_values(copy.output, lambda name: rename.get(name, name))
        for body in node_subgraphs(copy):  # bodies read branch values by name
            for g in walk_graphs(body):
                for n in g.node:
                    rename_values(n.input, lambda name: rename.get(name, name))
                for o in g.output:
                    o.name = rename.get(o.name, o.name)
        if copy.name:
            copy.name = make_name(copy.name)
        inlined.append(copy)
    for tensor in branch.initializer:
        moved = onnx.TensorProto()
        moved.CopyFrom(tensor)
        moved.name = rename[tensor.name]
        graph.initializer.append(moved)
    for source, wanted in bridges:
        inlined.append(onnx.helper.make_node("Identity", [rename.get(source, source)], [wanted],
                                             name=make_name(f"{node.name or 'if'}_branch_output")))
    return inlined
