"""remove-noops: drop nodes whose output is provably their input, bit for bit.

Kinds (each proven from attributes, constant inputs and static shapes/types, else skipped with a
counted reason): Identity; inference Dropout with an unused mask; Cast/CastLike to the input's
own type; Reshape to the input's shape; Transpose with the identity perm; Squeeze without axes of
a static shape with no 1s; Expand whose broadcast keeps the shape; Pad with all-zero pads; Slice
over the whole tensor; Concat of one input; x+(-0.0), x-(+0.0), x*1, x/1 whose constant does not
broadcast the shape (x+0.0 is not exact: -0.0+0.0 is +0.0, so it is counted skipped_signed_zero).

A removed node's output is renamed to its input everywhere it is read (subgraphs included). When
the output is a graph output, the value it copies is renamed to the output's name instead, when
that value is made by a kept node of the same graph and is not itself a graph output; otherwise
the node stays (``skipped_graph_output``). One sweep per graph decides, one walk then renames and
rebuilds each node list once. Types and shapes come from one shape inference, only when a
candidate needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import (STANDARD_DOMAINS, GraphIndex, WeightStore, apply_renames, infer_shapes, node_subgraphs, opset_version,
                     shadows_outer_names, walk_nodes)
from ..tensors import tensor_to_array
from .base import Pass, PassResult, count

# Ops whose check needs the input's type or shape (shape inference runs only if one is present).
_NEED_TYPES = frozenset({"Cast", "CastLike", "Reshape", "Transpose", "Squeeze", "Expand", "Slice",
                         "Add", "Sub", "Mul", "Div"})
_BIG = 2**62  # a Slice end at least this large covers any dimension


class _Skip(str):
    """A check's verdict: maybe a no-op, but not provably (the string is the reason)."""


class RemoveNoops(Pass):
    name = "remove-noops"
    summary = "remove nodes that compute nothing (Identity, same-type Cast, identity Reshape/Transpose, x*1, ...)"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"nodes_removed": 0}
        if shadows_outer_names(model.graph):
            stats["skipped_shadowed_names"] = 1  # renames by name would be ambiguous across scopes
            return PassResult(model, False, stats)
        inferred = _inferred_graph(model)
        top = _Sweep(stats, opset_version(model)).graph(model.graph, inferred, None)
        modified = stats["nodes_removed"] > 0
        if modified:
            _apply(top)
        return PassResult(model, modified, stats)


def _inferred_graph(model: onnx.ModelProto) -> onnx.GraphProto | None:
    if not any(n.op_type in _NEED_TYPES for n in walk_nodes(model.graph)):
        return None
    try:
        return infer_shapes(model, data_prop=True).graph
    except Exception:  # shape inference is a hint: without it, shape-dependent kinds are skipped
        return None


# --------------------------------------------------------------------------- scopes


@dataclass(eq=False)
class _Scope:
    graph: onnx.GraphProto
    parent: _Scope | None
    index: GraphIndex
    store: WeightStore
    types: dict[str, tuple[int, tuple | None]]
    outputs: set[str]
    alias: dict[str, str] = field(default_factory=dict)  # removed or renamed value -> value that replaces it
    removed: set[int] = field(default_factory=set)
    children: dict[int, list[_Scope]] = field(default_factory=dict)

    def chain(self):
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def resolve(self, name: str) -> str:
        while True:
            for scope in self.chain():
                if name in scope.alias:
                    name = scope.alias[name]
                    break
            else:
                return name

    def type_of(self, name: str) -> tuple[int, tuple | None] | None:
        for scope in self.chain():
            if name in scope.types:
                return scope.types[name]
        return None

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The constant tensor a value is (through removed Identity-like nodes), if any."""
        for candidate in dict.fromkeys((name, self.resolve(name))):
            for scope in self.chain():
                if candidate in scope.store:
                    return scope.store.tensor(candidate)
        return None


def _type_map(graph: onnx.GraphProto, inferred: onnx.GraphProto | None) -> dict[str, tuple[int, tuple | None]]:
    types: dict[str, tuple[int, tuple | None]] = {}
    for source in (graph, inferred):
        if source is None:
            continue
        for info in [*source.input, *source.value_info, *source.output]:
            if info.type.HasField("tensor_type"):
                t = info.type.tensor_type
                shape = None
                if t.HasField("shape"):
                    # dim_value <= 0 is taken as unknown: some exporters write -1 (or 0) for "any"
                    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                  else (d.dim_param or None) for d in t.shape.dim)
                known = types.get(info.name)
                if known is None or (known[1] is None and shape is not None) or not known[0]:
                    types[info.name] = (t.elem_type or (known[0] if known else 0), shape)
    for init in graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    return types


class _Sweep:
    def __init__(self, stats: dict[str, int | float], opset: int) -> None:
        self.stats = stats
        self.opset = opset

    def graph(self, graph: onnx.GraphProto, inferred: onnx.GraphProto | None, parent: _Scope | None) -> _Scope:
        scope = _Scope(graph, parent, GraphIndex(graph), WeightStore(graph), _type_map(graph, inferred),
                       {o.name for o in graph.output})
        for name in scope.store.names():
            if scope.store.is_constant_node(name):
                tensor = scope.store.tensor(name)
                if tensor is not None:
                    scope.types.setdefault(name, (tensor.data_type, tuple(tensor.dims)))
        nodes = scope.index.nodes
        inferred_nodes = list(inferred.node) if inferred is not None and len(inferred.node) == len(nodes) else None
        for i in scope.index.topological_order():
            node = nodes[i]
            if node.attribute:
                subs = list(node_subgraphs(node))
                if subs:
                    inner = (list(node_subgraphs(inferred_nodes[i])) if inferred_nodes is not None
                             else [None] * len(subs))
                    if len(inner) != len(subs):
                        inner = [None] * len(subs)
                    scope.children[i] = [self.graph(s, t, scope) for s, t in zip(subs, inner)]
            if node.domain not in STANDARD_DOMAINS:
                continue
            check = _KINDS.get(node.op_type)
            if check is None or not node.output or not node.input:
                continue
            verdict = check(self, scope, node)
            if verdict is None:
                continue
            if isinstance(verdict, _Skip):
                count(self.stats, "skipped_" + verdict)
                continue
            self._remove(scope, i, node, verdict)
        return scope

    def _remove(self, scope: _Scope, i: int, node: onnx.NodeProto, data: str) -> None:
        out = node.output[0]
        if out in scope.outputs:
            source = scope.resolve(data)
            producer = scope.index.producer.get(source)
            if (producer is None or producer in scope.removed or source in scope.outputs
                    or source in scope.alias):
                count(self.stats, "skipped_graph_output")
                return
            scope.alias[source] = out  # the producer of the copied value now writes the output
            count(self.stats, "producers_renamed")
        elif out:
            scope.alias[out] = scope.resolve(data)  # resolved now: no-op chains stay short
        scope.removed.add(i)
        self.stats["nodes_removed"] += 1
        count(self.stats, "removed_" + node.op_type)

    # ---------------------------------------------------------------- kinds
    # Each returns the input the output equals, _Skip(reason) when unprovable, None when not a no-op.

    def _identity(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return node.input[0] if node.input and node.input[0] else None

    def _dropout(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        if self.opset < 7 and not any(a.name == "is_test" and a.i == 1 for a in node.attribute):
            return _Skip("dropout_training")
        if len(node.input) > 2 and node.input[2]:
            mode = scope.constant(node.input[2])
            if mode is None or mode.data_type != onnx.TensorProto.BOOL or _array(mode).any():
                return _Skip("dropout_training")
        if len(node.output) > 1 and node.output[1]:
            mask = node.output[1]
            if mask in scope.outputs or scope.index.consumers.get(mask):
                return _Skip("dropout_mask_used")
        return node.input[0]

    def _cast(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        known = scope.type_of(node.input[0])
        if to is None or known is None or not known[0]:
            return _Skip("unknown_type")
        return node.input[0] if known[0] == to else None

    def _castlike(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        a, b = scope.type_of(node.input[0]), scope.type_of(node.input[1])
        if a is None or b is None or not a[0] or not b[0]:
            return _Skip("unknown_type")
        return node.input[0] if a[0] == b[0] else None

    def _reshape(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        if len(node.input) < 2:
            return _Skip("old_opset")  # Reshape-1 (shape attribute) is not handled
        found = _target_and_shape(scope, node)
        if isinstance(found, _Skip):
            return found
        target, shape = found
        if len(target) != len(shape):
            return None
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        for k, (t, d) in enumerate(zip(target, shape)):
            if t == 0 and not allowzero:
                continue  # copies the input dimension
            if t == -1:
                # The inferred dimension equals d when every other one matches and their product is
                # known and nonzero (a 0 or unknown there makes -1 ambiguous: keep the node).
                others = [shape[j] if (target[j] == 0 and not allowzero) else target[j]
                          for j in range(len(target)) if j != k]
                if all(isinstance(o, int) and o > 0 for o in others):
                    continue
                return _Skip("unknown_shape")
            if not isinstance(d, int):
                return _Skip("unknown_shape")
            if t != d:
                return None
        return node.input[0]

    def _transpose(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is not None:
            return node.input[0] if perm == list(range(len(perm))) else None
        shape = _shape(scope, node.input[0])
        if shape is None:
            return _Skip("unknown_shape")
        return node.input[0] if len(shape) <= 1 else None  # no perm: reversed dimensions

    def _squeeze(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        if any(a.name == "axes" for a in node.attribute) or (len(node.input) > 1 and node.input[1]):
            return None  # explicit axes remove dimensions (empty axes are not trusted either)
        shape = _shape(scope, node.input[0])
        if shape is not None and 1 in shape:
            return None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return _Skip("unknown_shape")  # a symbolic dimension may be 1
        return node.input[0]

    def _expand(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        found = _target_and_shape(scope, node)
        if isinstance(found, _Skip):
            return found
        target, shape = found
        verdict = _broadcast_keeps(shape, target)
        if verdict is True:
            return node.input[0]
        return None if verdict is False else _Skip("unknown_shape")

    def _pad(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        pads = next((list(a.ints) for a in node.attribute if a.name in ("pads", "paddings")), None)
        if pads is None:
            if len(node.input) < 2 or not node.input[1]:
                return None
            pads = _ints(scope, node.input[1])
            if pads is None:
                return _Skip("not_constant")
        return node.input[0] if not any(pads) else None

    def _slice(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        attrs = {a.name: list(a.ints) for a in node.attribute}
        if "starts" in attrs:  # Slice-1
            starts, ends, axes, steps = attrs["starts"], attrs.get("ends"), attrs.get("axes"), None
        else:
            params: list[list[int] | None] = []
            for k in range(1, 5):
                name = node.input[k] if k < len(node.input) else ""
                values = _ints(scope, name) if name else None
                if name and values is None:
                    return _Skip("not_constant")
                params.append(values)
            starts, ends, axes, steps = params
        if starts is None or ends is None:
            return None
        shape = _shape(scope, node.input[0])
        if shape is None:
            return _Skip("unknown_shape")
        rank = len(shape)
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if not len(starts) == len(ends) == len(axes) == len(steps):
            return None
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step != 1:
                return None
            if not -rank <= axis < rank:
                return None
            d = shape[axis % rank]
            if start < 0:
                if not isinstance(d, int):
                    return _Skip("unknown_shape")
                if start > -d:
                    return None
            elif start > 0:
                return None
            if isinstance(d, int):
                if end < d:
                    return None
            elif end < _BIG:
                return _Skip("unknown_shape")
        return node.input[0]

    def _concat(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return node.input[0] if len(node.input) == 1 and node.input[0] else None

    def _add(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return self._neutral(scope, node, 0.0, either_side=True, negative_zero=True)

    def _sub(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return self._neutral(scope, node, 0.0, either_side=False, negative_zero=False)

    def _mul(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return self._neutral(scope, node, 1.0, either_side=True, negative_zero=None)

    def _div(self, scope: _Scope, node: onnx.NodeProto) -> str | None:
        return self._neutral(scope, node, 1.0, either_side=False, negative_zero=None)

    def _neutral(self, scope: _Scope, node: onnx.NodeProto, neutral: float, either_side: bool,
                 negative_zero: bool | None) -> str | None:
        """x op c == x when c is all ``neutral`` (zeros of the right sign for floats) and keeps x's shape."""
        if len(node.input) != 2:
            return None
        sides = ((1, 0), (0, 1)) if either_side else ((1, 0),)
        reason = None
        for c_pos, x_pos in sides:
            tensor = scope.constant(node.input[c_pos])
            if tensor is None:
                continue
            if not _all_neutral(tensor, neutral, negative_zero):
                if negative_zero is not None and _all_neutral(tensor, neutral, None):
                    reason = reason or _Skip("signed_zero")
                continue
            x = node.input[x_pos]
            known = scope.type_of(x)
            if known is not None and known[0] and known[0] != tensor.data_type:
                reason = reason or _Skip("type_mismatch")
                continue
            c_shape = tuple(tensor.dims)
            if not c_shape:
                return x  # a scalar never broadcasts x to anything else
            shape = known[1] if known is not None else None
            if shape is None:
                reason = reason or _Skip("unknown_shape")
                continue
            if _broadcast_keeps(shape, c_shape) is True:
                return x
            reason = reason or _Skip("broadcast")
        return reason


_KINDS = {
    "Identity": _Sweep._identity, "Dropout": _Sweep._dropout, "Cast": _Sweep._cast, "CastLike": _Sweep._castlike,
    "Reshape": _Sweep._reshape, "Transpose": _Sweep._transpose, "Squeeze": _Sweep._squeeze,
    "Expand": _Sweep._expand, "Pad": _Sweep._pad, "Slice": _Sweep._slice, "Concat": _Sweep._concat,
    "Add": _Sweep._add, "Sub": _Sweep._sub, "Mul": _Sweep._mul, "Div": _Sweep._div,
}


# --------------------------------------------------------------------------- helpers


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    return tensor_to_array(tensor)


def _target_and_shape(scope: _Scope, node: onnx.NodeProto):
    """(constant target of input 1, static shape of input 0) of a Reshape / Expand, or why not known."""
    target = _ints(scope, node.input[1])
    if target is None:
        return _Skip("not_constant")
    shape = _shape(scope, node.input[0])
    if shape is None:
        return _Skip("unknown_shape")
    return target, shape


def _ints(scope: _Scope, name: str) -> list[int] | None:
    tensor = scope.constant(name)
    if tensor is None or tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) \
            or len(tensor.dims) > 1 or (tensor.dims and tensor.dims[0] > 1 << 16):
        return None  # shapes, pads and slice bounds are short vectors
    return [int(v) for v in _array(tensor).reshape(-1)]


def _shape(scope: _Scope, name: str) -> tuple | None:
    known = scope.type_of(name)
    return None if known is None else known[1]


def _broadcast_keeps(shape: tuple, other: tuple | list) -> bool | None:
    """Whether broadcasting ``shape`` with ``other`` gives ``shape``: True, False, or None (unknown)."""
    if len(other) > len(shape):
        return False
    unknown = False
    for d, o in zip(shape[len(shape) - len(other):], other):
        if o == 1:
            continue
        if isinstance(d, int):
            if d != o:
                return False
        else:
            unknown = True
    return None if unknown else True


def _all_neutral(tensor: onnx.TensorProto, neutral: float, negative_zero: bool | None) -> bool:
    """Every element equals ``neutral``; for float zeros, also with the sign asked (None: any sign)."""
    if int(np.prod(tensor.dims, dtype=np.int64)) > 1 << 20:
        return False  # a constant this big is not a broadcast neutral element worth reading
    try:
        array = _array(tensor)
    except Exception:
        return False
    if array.dtype.kind not in "fiu" or array.size == 0:
        return False
    if not np.all(array == neutral):
        return False
    if array.dtype.kind == "f" and negative_zero is not None:
        return bool(np.all(np.signbit(array) == negative_zero))
    return True


# --------------------------------------------------------------------------- rewrite


def _apply(scope: _Scope) -> None:
    """Rename uses (and renamed producers' outputs), then rebuild each node list once."""
    for i in range(len(scope.index.nodes)):
        if i not in scope.removed:
            for child in scope.children.get(i, ()):
                _apply(child)
    apply_renames(scope.graph, scope.index.nodes, scope.removed, scope.resolve, scope.alias.keys(),
                  is_body=scope.parent is not None)
