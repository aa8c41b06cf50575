"""Graph helpers every pass shares: indices built once, subgraph walks, and one weight accessor.

Weights live in initializers or in ``Constant`` nodes (paddle2onnx and many exporters use the
latter). :class:`WeightStore` hides the difference so a weight pass reads and writes both alike.
Tensors whose data is external are read lazily from disk (see :mod:`onnxopt.modelio`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .data import input_dims
from .tensors import is_external, set_external_location, set_tensor_array, tensor_nbytes, tensor_to_array

STANDARD_DOMAINS = ("", "ai.onnx")
# ops whose outputs differ from run to run: never computed ahead of time, never merged
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})


def is_nondeterministic(node: onnx.NodeProto, opset: int) -> bool:
    """Whether a node's outputs may differ from run to run: a random op, or a Dropout in training mode."""
    if node.op_type in NONDETERMINISTIC_OPS:
        return True
    if node.op_type != "Dropout":
        return False
    if opset < 7:  # is_test attribute era: random unless is_test=1
        return not any(a.name == "is_test" and a.i == 1 for a in node.attribute)
    return len(node.input) > 2 and bool(node.input[2])  # training_mode given: may be random


# --------------------------------------------------------------------------- walks


def node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Bodies held by a node's attributes (If branches, Loop/Scan bodies, ...)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every graph nested in it, outer before inner."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield current
        for node in current.node:
            stack.extend(node_subgraphs(node))


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in walk_graphs(graph):
        yield from g.node


def model_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from walk_graphs(model.graph)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that holds weights: initializers and Constant/attribute tensors, in all graphs."""
    for graph in model_graphs(model):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(t.name for t in graph.sparse_initializer if t.values.name)
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from its enclosing scopes: its outer-scope references."""
    defined = defined_names(graph)
    used: set[str] = set()
    for node in graph.node:
        used.update(node_uses(node))
    used.update(o.name for o in graph.output)
    return {n for n in used if n and n not in defined}


def node_uses(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs plus outer-scope references of its subgraphs."""
    uses = [i for i in node.input if i]
    if node.attribute:
        for sub in node_subgraphs(node):
            uses.extend(free_names(sub))
    return uses


# --------------------------------------------------------------------------- index


@dataclass
class GraphIndex:
    """Producer and consumer indices of one graph, built once (node positions, not copies)."""

    graph: onnx.GraphProto
    nodes: list[onnx.NodeProto] = field(init=False)
    producer: dict[str, int] = field(init=False)
    consumers: dict[str, list[int]] = field(init=False)
    uses: list[list[str]] = field(init=False)
    output_names: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.node)
        self.producer = {}
        self.consumers = {}
        self.uses = []
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            node_use = node_uses(node)
            self.uses.append(node_use)
            for name in dict.fromkeys(node_use):
                self.consumers.setdefault(name, []).append(i)
        self.output_names = {o.name for o in self.graph.output}

    def consumer_nodes(self, name: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(name, ())]

    def producer_node(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def is_graph_output(self, name: str) -> bool:
        return name in self.output_names

    def topological_order(self) -> list[int] | range:
        """Node positions in an order where producers come before consumers: the node order itself
        when it already is one (the usual case), else Kahn's."""
        if all(self.producer.get(name, -1) < i for i, node_use in enumerate(self.uses) for name in node_use):
            return range(len(self.nodes))
        pending = [0] * len(self.nodes)
        for i, node_use in enumerate(self.uses):
            pending[i] = sum(1 for n in set(node_use) if n in self.producer)
        ready = deque(i for i, count in enumerate(pending) if count == 0)
        order: list[int] = []
        while ready:
            i = ready.popleft()
            order.append(i)
            for out in {o for o in self.nodes[i].output if o}:
                for j in self.consumers.get(out, ()):
                    pending[j] -= 1
                    if pending[j] == 0:
                        ready.append(j)
        if len(order) != len(self.nodes):
            from .errors import InputError

            raise InputError("the graph has a cycle: no topological order exists")
        return order


def filter_field(field, keep) -> int:
    """Keep the items of a protobuf repeated field that ``keep`` accepts, rebuilding it once (never
    removing elements one by one); how many went."""
    kept = [item for item in field if keep(item)]
    removed = len(field) - len(kept)
    if removed:
        del field[:]
        field.extend(kept)
    return removed


def shadows_outer_names(graph: onnx.GraphProto, outer: tuple[set[str], ...] = ()) -> bool:
    """Whether some subgraph defines a name an enclosing graph defines too (invalid ONNX, but seen).

    Renames by name across scopes are only sound without shadowing; graphs without bodies cost
    one scan of their nodes' attributes.
    """
    if not outer and not any(node.attribute and any(node_subgraphs(node)) for node in graph.node):
        return False
    defined = defined_names(graph)
    if any(name in scope for scope in outer for name in defined):
        return True
    inner = (*outer, defined)
    return any(shadows_outer_names(sub, inner) for node in graph.node if node.attribute
               for sub in node_subgraphs(node))


def rename_values(names, resolve: Callable[[str], str]) -> None:
    """Rename the entries of a repeated string field (node inputs or outputs) in place; '' stays."""
    for k, name in enumerate(names):
        if name:
            new = resolve(name)
            if new != name:
                names[k] = new


def apply_renames(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], removed: set[int],
                  resolve: Callable[[str], str], gone: Iterable[str], is_body: bool) -> None:
    """Rename the kept nodes' inputs and outputs by ``resolve``, rebuild the node list once if nodes
    went, follow renames in a body's outputs (they may name outer values), drop ``gone`` value_info."""
    for i, node in enumerate(nodes):
        if i not in removed:
            rename_values(node.input, resolve)
            rename_values(node.output, resolve)
    if removed:
        replace_nodes(graph, (n for i, n in enumerate(nodes) if i not in removed))
    if is_body:
        for out in graph.output:
            out.name = resolve(out.name)
    gone = set(gone)
    if gone:
        filter_field(graph.value_info, lambda v: v.name not in gone)


def replace_nodes(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Rebuild ``graph.node`` once (never remove elements one by one)."""
    kept = list(nodes)
    del graph.node[:]
    graph.node.extend(kept)


# --------------------------------------------------------------------------- weights


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a standard ``Constant`` node produces (``value`` or the scalar/list forms)."""
    if node.op_type != "Constant" or node.domain not in STANDARD_DOMAINS:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32), node.output[0])
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(attr.floats, dtype=np.float32), node.output[0])
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64), node.output[0])
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(attr.ints, dtype=np.int64), node.output[0])
    return None


# The reference evaluator has one implementation of these ops, right from this opset on only (before 13,
# Softmax & co. flattened the input to 2-D at ``axis``; before 16, RoiAlign's default coordinates were
# not half_pixel); its LRN is wrong at every opset (it loops over the batch axis, not the channels).
REFERENCE_RIGHT_FROM_OPSET = {"Softmax": 13, "LogSoftmax": 13, "Hardmax": 13, "RoiAlign": 16, "LRN": 1 << 30}


class NodeEvaluationError(Exception):
    """A node the ONNX reference cannot evaluate; ``reason`` is a stats-key fragment."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def evaluate_node(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list:
    """Outputs of one standard-domain node on numpy inputs, by ONNX reference semantics.

    The reference runs a bare node by the newest version of its op (it ignores ``opsets`` for a
    node), which it implements best; REFERENCE_RIGHT_FROM_OPSET lists the ops whose older semantics
    it would silently miss. An old form the newest version rejects (Unsqueeze-11's ``axes``
    attribute, Clip-6, Pad-2, ...) is run again inside a one-node model of the given opset, where the
    reference picks that version. Raises NodeEvaluationError with reason ``unsupported_<op>`` (no
    right reference implementation at this opset) or ``evaluation_error`` (it fails on these inputs).
    """
    from onnx.reference import ReferenceEvaluator  # heavy import, only for passes that evaluate

    if opset < REFERENCE_RIGHT_FROM_OPSET.get(node.op_type, 0):
        raise NodeEvaluationError(f"unsupported_{node.op_type}")
    if node.domain:  # "ai.onnx" is the default domain under another name
        plain = onnx.NodeProto()
        plain.CopyFrom(node)
        plain.domain = ""
        node = plain
    feeds = {k: v for k, v in feeds.items() if k}
    try:
        with np.errstate(all="ignore"):
            return ReferenceEvaluator(node).run(None, feeds)
    except Exception:
        pass  # an old form: try the version of this opset
    try:
        evaluator = ReferenceEvaluator(_one_node_model(node, feeds, opset))
    except Exception:
        raise NodeEvaluationError(f"unsupported_{node.op_type}") from None
    try:
        with np.errstate(all="ignore"):
            return evaluator.run(None, feeds)
    except Exception:
        raise NodeEvaluationError("evaluation_error") from None


def _one_node_model(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    """``node`` alone in a model of ``opset``, its inputs typed from the feeds (for the reference only)."""
    helper = onnx.helper
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
              for name, array in feeds.items()]
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in node.output if name]
    graph = helper.make_graph([node], "evaluate", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# ops exporters wrap weights in (paddle: a Conv bias as Reshape(Constant)); ConstantResolver sees through them
CONSTANT_FOLDABLE = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Identity", "Cast", "Flatten"})
MAX_EVALUATED_ELEMENTS = 1 << 20  # a derived constant from bigger inputs is not computed (biases are far smaller)


class WeightStore:
    """Constant tensors of one graph by value name: initializers and ``Constant`` outputs alike.

    Initializers that are also graph inputs can be overridden at run time, so they are not weights.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        overridable = {i.name for i in graph.input}
        self._initializers = {t.name: t for t in graph.initializer if t.name not in overridable}
        self._constants: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and node.output:
                self._constants[node.output[0]] = node

    def __contains__(self, name: str) -> bool:
        return name in self._initializers or name in self._constants

    def names(self) -> list[str]:
        return [*self._initializers, *self._constants]

    def is_constant_node(self, name: str) -> bool:
        return name in self._constants

    def tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self._initializers:
            return self._initializers[name]
        node = self._constants.get(name)
        return None if node is None else constant_tensor(node)

    def array(self, name: str, out: np.ndarray | None = None) -> np.ndarray | None:
        """The weight's values (``out``: a flat buffer external data is read into, see :func:`tensor_to_array`)."""
        tensor = self.tensor(name)
        return None if tensor is None else tensor_to_array(tensor, out)

    def set_array(self, name: str, array: np.ndarray) -> None:
        """Write new values for a weight where it lives (initializer or Constant ``value``)."""
        if name in self._initializers:
            set_tensor_array(self._initializers[name], array)
            return
        node = self._constants[name]
        tensor = numpy_helper.from_array(np.require(array, requirements="C"))
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", tensor))

    def add_initializer(self, name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.require(array, requirements="C"), name)
        self.graph.initializer.append(tensor)
        self._initializers[name] = self.graph.initializer[-1]


def parameter_count(graph: onnx.GraphProto) -> int:
    """Elements of the graph's initializers and Constant tensors."""
    store = WeightStore(graph)
    return sum(int(np.prod(store.tensor(name).dims, dtype=np.int64)) for name in store.names())


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (1 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 1)


def unique_name_factory(model: onnx.ModelProto):
    """A function giving names that collide with no value or node name anywhere in the model."""
    taken: set[str] = set()
    for g in model_graphs(model):
        taken |= defined_names(g)
        taken.update(n.name for n in g.node if n.name)
        taken.update(o.name for o in g.output)
    counter = [0]

    def make(base: str) -> str:
        candidate = base
        while candidate in taken:
            counter[0] += 1
            candidate = f"{base}_{counter[0]}"
        taken.add(candidate)
        return candidate

    return make


def model_names(model: onnx.ModelProto) -> set[str]:
    """Every value name defined or read anywhere in the model (main graph and subgraphs)."""
    names: set[str] = set()
    for g in model_graphs(model):
        names |= defined_names(g)
        names.update(o.name for o in g.output)
        for node in g.node:
            names.update(n for n in node.input if n)
    return names


def shorten_names(model: onnx.ModelProto, kept: set[str]) -> int:
    """Rename every value not in ``kept`` (the names a pass found: the user's) to the shortest free name,
    ``_0`` .. ``_z``, ``_10`` .. in base 36, in one walk. Names a pass generates only need to be unique, and
    each is stored at least twice (producer and reader): on the int8 sample transformer such names as
    ``tmp_11_int32`` were 1 KB of its 55 KB. The main graph's inputs and outputs are never renamed.
    How many values were renamed."""
    interface = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    taken = model_names(model)
    fresh = sorted(taken - kept - interface)  # sorted: the same model gives the same names
    free = (name for name in (f"_{np.base_repr(n, 36).lower()}" for n in itertools.count()) if name not in taken)
    rename = dict(zip(fresh, free))
    if not rename:
        return 0
    for g in model_graphs(model):
        for node in g.node:
            rename_values(node.input, lambda n: rename.get(n, n))
            rename_values(node.output, lambda n: rename.get(n, n))
        for field in (g.initializer, g.value_info, g.output, g.input):
            for item in field:
                item.name = rename.get(item.name, item.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = rename.get(sparse.values.name, sparse.values.name)
    return len(rename)


SHAPE_ONLY_BYTES = 4096  # tensors above this size matter to shape inference by their dims alone
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def infer_shapes(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` on a copy whose big weights are dims only.

    Inference passes the model to C++ and back as bytes; the weights' values matter only where
    an op reads a small constant (a Reshape's shape), so big ones go as external tensors that are
    never read: the same shapes, at 0.09 s instead of 0.29 s on a 68 MB encoder. Raises what
    onnx raises (callers treat inference as a hint).
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in model_tensors(skeleton):
        if (not is_external(tensor) and tensor.data_type != onnx.TensorProto.STRING
                and tensor_nbytes(tensor) > SHAPE_ONLY_BYTES):
            for name in _DATA_FIELDS:
                tensor.ClearField(name)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            set_external_location(tensor, "__shape_inference_reads_no_data__")
    return onnx.shape_inference.infer_shapes(skeleton, **options)


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Static shapes known after shape inference (symbolic dims as strings, unknown as None)."""
    try:
        inferred = infer_shapes(model, data_prop=True)
    except Exception:  # shape inference is a hint; a pass must still work without it
        inferred = model
    shapes: dict[str, tuple] = {}
    g = inferred.graph
    for info in [*g.input, *g.value_info, *g.output]:
        dims = input_dims(info)
        if dims is not None:
            shapes[info.name] = tuple(dims)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


class ConstantResolver:
    """Constant values of one graph: its weights (initializers that are not graph inputs, Constant
    nodes) and small chains of Reshape / Unsqueeze / ... over them, computed once each with
    :func:`evaluate_node`. Inputs bigger than MAX_EVALUATED_ELEMENTS are not evaluated."""

    def __init__(self, index: GraphIndex, store: WeightStore, opset: int) -> None:
        self.index, self.store, self.opset = index, store, opset
        self._derived: dict[str, np.ndarray | None] = {}
        self._local: set[str] | None = None

    def value(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.store:
            return self.store.array(name)
        # the chain is resolved producers first with a stack, not recursion: exported chains can be long
        stack, expanding = [name], set()
        while stack:
            current = stack[-1]
            if current in self._derived or current in self.store:
                stack.pop()
                continue
            node = self._foldable_producer(current)
            pending = [] if node is None else [n for n in node.input if n and n not in self.store and n not in self._derived]
            if pending and current not in expanding:  # a name met again while expanding is a cycle: left unresolved
                expanding.add(current)
                stack.extend(pending)
                continue
            stack.pop()
            self._derived[current] = None if node is None else self._evaluate(node, current)
        return self._derived[name]

    def _foldable_producer(self, name: str) -> onnx.NodeProto | None:
        node = self.index.producer_node(name)
        if (node is None or node.op_type not in CONSTANT_FOLDABLE or node.domain not in STANDARD_DOMAINS
                or any(node_subgraphs(node))):
            return None
        return node

    def _evaluate(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        """``name`` (an output of ``node``) from its inputs, all resolved already (None: not constant)."""
        inputs = [(self.store.array(n) if n in self.store else self._derived.get(n)) if n else None for n in node.input]
        if any(x is None for x, n in zip(inputs, node.input) if n):
            return None
        if sum(x.size for x in inputs if x is not None) > MAX_EVALUATED_ELEMENTS:
            return None
        try:
            outputs = evaluate_node(node, {n: x for n, x in zip(node.input, inputs) if n}, self.opset)
        except NodeEvaluationError:
            return None
        return np.asarray(outputs[list(node.output).index(name)])

    def is_outer(self, name: str) -> bool:
        """Whether a name comes from an enclosing graph (a body's outer-scope reference)."""
        if self._local is None:
            self._local = defined_names(self.index.graph)
        return bool(name) and name not in self._local
