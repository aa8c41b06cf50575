"""cse: common subexpression elimination: one node (or one constant) per distinct computation.

One sweep per graph in topological order keys each node by (domain, op_type, attributes
serialized deterministically, canonical input names, which outputs are present); a node whose
key is already in the table is dropped and its outputs' uses are renamed to the earlier node's.
Because keys use canonical names (after earlier merges), whole duplicated chains merge in the
same sweep. Constants (initializers and ``Constant`` nodes) are keyed by dtype and shape first,
and their first MiB is hashed only when a second constant of the same dtype and shape turns up,
all their bytes only when the first MiB matches too, then compared byte for byte on equal hashes:
a model whose weights differ in shape is never read, and same-shaped weights only by their first MiB.

Scopes: a subgraph (If/Loop/Scan body) is swept when its node is reached, with the enclosing
table visible, so an inner node equal to an outer value computed earlier reuses it. Renames are
applied after the whole sweep, in one walk that reaches outer-scope reads inside subgraphs.

Never merged: non-deterministic ops (Random*, Multinomial, Bernoulli, training Dropout), ops of
domains whose semantics are unknown, nodes whose bodies hold either. A node that produces a
graph output is dropped only when the earlier node's output can take that output's name (same
graph, not itself a graph output): graph output names and the interface never change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import onnx

from ..graph import (GraphIndex, apply_renames, constant_tensor, filter_field, is_nondeterministic, node_subgraphs,
                     opset_version, shadows_outer_names)
from ..tensors import external_info, is_external, tensor_nbytes
from .base import Pass, PassResult, count

KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CseOptions:
    # External-data tensors larger than this are never read to be hashed (counted as
    # skipped_large_external_constant): merging two multi-GB weights is rare, reading them all is not.
    max_external_bytes: int = 256 << 20


class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "merge nodes that compute the same thing from the same inputs, and equal constants"
    exact = True
    Options = CseOptions

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"nodes_merged": 0, "constants_merged": 0}
        if shadows_outer_names(model.graph):
            stats["skipped_shadowed_names"] = 1  # names would be ambiguous across scopes
            return PassResult(model, False, stats)
        sweep = _Sweep(stats, self.options.max_external_bytes, opset_version(model))
        top = sweep.graph(model.graph, None)
        modified = bool(stats["nodes_merged"] or stats["constants_merged"])
        if modified:
            _apply(top)
        return PassResult(model, modified, stats)


# --------------------------------------------------------------------------- scopes


@dataclass(eq=False)
class _Const:
    name: str
    tensor: onnx.TensorProto
    scope: _Scope
    is_node: bool
    key: tuple = ()  # (dtype, dims), then the head digest, then the full digest, as far as computed
    too_big: bool = False


@dataclass(eq=False)
class _Rep:
    outputs: list[str]
    scope: _Scope


@dataclass(eq=False)
class _Scope:
    graph: onnx.GraphProto
    parent: _Scope | None
    outputs: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    table: dict[tuple, _Rep] = field(default_factory=dict)
    waiting: dict[tuple, list[_Const]] = field(default_factory=dict)  # constants by their key so far
    seen: set[tuple] = field(default_factory=set)  # every key (at every level) of the constants defined here
    canon: dict[str, str] = field(default_factory=dict)  # dropped value -> the value that replaces it
    display: dict[str, str] = field(default_factory=dict)  # kept value -> graph output name it takes
    dropped_nodes: set[int] = field(default_factory=set)
    dropped_inits: set[str] = field(default_factory=set)
    children: dict[int, list[_Scope]] = field(default_factory=dict)
    impure: bool = False

    def chain(self):
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def canonical(self, name: str) -> str:
        for scope in self.chain():
            if name in scope.canon:
                return scope.canon[name]  # targets are never dropped: one hop
        return name

    def final(self, name: str) -> str:
        name = self.canonical(name)
        for scope in self.chain():
            if name in scope.display:
                return scope.display[name]
        return name

    def lookup(self, key: tuple) -> _Rep | None:
        for scope in self.chain():
            rep = scope.table.get(key)
            if rep is not None:
                return rep
        return None


class _Sweep:
    def __init__(self, stats: dict[str, int | float], max_external_bytes: int, opset: int) -> None:
        self.stats = stats
        self.max_external_bytes = max_external_bytes
        self.opset = opset

    def graph(self, graph: onnx.GraphProto, parent: _Scope | None) -> _Scope:
        scope = _Scope(graph, parent, {o.name for o in graph.output})
        inputs = {i.name for i in graph.input}
        for init in graph.initializer:
            if init.name in inputs:  # overridable at run time: not a constant
                continue
            entry = _Const(init.name, init, scope, is_node=False)
            rep = self._find_const(entry)
            if rep is None:
                self._register(entry)
            elif init.name in scope.outputs:
                count(self.stats, "skipped_graph_output")
            else:
                scope.canon[init.name] = rep.name
                scope.dropped_inits.add(init.name)
                self.stats["constants_merged"] += 1
        scope.nodes = nodes = list(graph.node)
        for i in GraphIndex(graph).topological_order():
            self._node(scope, i, nodes[i])
        return scope

    # ---------------------------------------------------------------- nodes

    def _node(self, scope: _Scope, i: int, node: onnx.NodeProto) -> None:
        subs = list(node_subgraphs(node)) if node.attribute else []
        if not self._mergeable(scope, node):
            self._children(scope, i, subs)  # kept as it is, but its bodies are swept all the same
            return
        tensor = constant_tensor(node) if node.op_type == "Constant" else None
        if tensor is not None:
            entry = _Const(node.output[0], tensor, scope, is_node=True)
            rep = self._find_const(entry)
            if rep is None:
                self._register(entry)
            elif self._merge(scope, i, node, [rep.name], rep.scope if rep.is_node else None):
                self.stats["constants_merged"] += 1
            return
        # Bodies are part of the key as they are written (their outer reads are names, resolved in
        # this same scope for both nodes), so a duplicate is dropped before its bodies are swept;
        # a registered node had pure bodies, hence so does its byte-equal duplicate.
        key = _node_key(scope, node)
        rep = scope.lookup(key)
        if rep is not None and self._merge(scope, i, node, rep.outputs, rep.scope):
            self.stats["nodes_merged"] += 1
            return
        if subs and any(child.impure for child in self._children(scope, i, subs)):
            scope.impure = True
            count(self.stats, "skipped_impure_subgraph")
            return
        if rep is None:
            scope.table[key] = _Rep(list(node.output), scope)

    def _children(self, scope: _Scope, i: int, subs: list[onnx.GraphProto]) -> list[_Scope]:
        if not subs:
            return []
        children = scope.children[i] = [self.graph(sub, scope) for sub in subs]
        if any(child.impure for child in children):
            scope.impure = True  # an enclosing node's bodies hold it too
        return children

    def _mergeable(self, scope: _Scope, node: onnx.NodeProto) -> bool:
        if not any(node.output):
            return False
        if node.domain not in KNOWN_DOMAINS:
            scope.impure = True
            count(self.stats, "skipped_custom_domain")
            return False
        if is_nondeterministic(node, self.opset):
            scope.impure = True
            count(self.stats, "skipped_nondeterministic")
            return False
        return True

    def _merge(self, scope: _Scope, i: int, node: onnx.NodeProto, rep_outputs: list[str],
               rep_node_scope: _Scope | None) -> bool:
        """Drop ``node`` in favour of values ``rep_outputs``; False (node kept) when a graph output blocks it.

        ``rep_node_scope`` is the scope of the node that produces ``rep_outputs`` (None for an
        initializer): only a node of this same graph can be renamed to a graph output's name.
        """
        renames, displays = [], []
        for a, b in zip(rep_outputs, node.output):
            if not b:
                continue
            if b not in scope.outputs:
                renames.append((b, a))
            elif (rep_node_scope is scope and a not in scope.outputs and a not in scope.display
                  and all(a != x for x, _ in displays)):
                displays.append((a, b))
            else:
                count(self.stats, "skipped_graph_output")
                return False
        for b, a in renames:
            scope.canon[b] = a
        for a, b in displays:
            scope.canon[b] = a  # keys keep using a; a takes the name b when uses are rewritten
            scope.display[a] = b
        scope.dropped_nodes.add(i)
        return True

    # ---------------------------------------------------------------- constants

    def _find_const(self, entry: _Const) -> _Const | None:
        """An earlier equal constant, reading as little as possible: the key is refined level by level
        ((dtype, dims), the first _CHUNK bytes, all bytes) only while another constant shares it, and
        those others are refined then too; full keys are confirmed byte for byte."""
        entry.key = (entry.tensor.data_type, tuple(entry.tensor.dims))
        chain = list(entry.scope.chain())
        for limit in (_CHUNK, None):
            if not any(entry.key in scope.seen for scope in chain):
                return None  # the first constant with this key: nothing more to read
            for scope in chain:
                for other in scope.waiting.pop(entry.key, ()):
                    self._refine(other, limit)
                    self._register(other)
            if not self._refine(entry, limit):
                return None
        for scope in chain:
            for other in scope.waiting.get(entry.key, ()):
                if _same_bytes(entry.tensor, other.tensor):
                    return other
        return None

    def _register(self, entry: _Const) -> None:
        """Record a kept constant under its key (and every shorter key, so later ones know to look)."""
        scope = entry.scope
        scope.seen.update(entry.key[:n] for n in range(1, len(entry.key) + 1))
        if not entry.too_big:
            scope.waiting.setdefault(entry.key, []).append(entry)

    def _refine(self, entry: _Const, limit: int | None) -> bool:
        """Extend the key by a digest of the first ``limit`` bytes (None: all); False when the tensor
        is an external one too big to read."""
        tensor = entry.tensor
        if entry.too_big or is_external(tensor) and tensor_nbytes(tensor) > self.max_external_bytes:
            if not entry.too_big:
                entry.too_big = True
                count(self.stats, "skipped_large_external_constant")
            return False
        h = hashlib.blake2b(digest_size=16)
        left = limit
        for chunk in _tensor_chunks(tensor):
            if left is not None:
                chunk = chunk[:left]
                left -= len(chunk)
            h.update(chunk)
            if left == 0:
                break
        entry.key = (*entry.key, h.digest())
        return True


def _node_key(scope: _Scope, node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
    return (
        "" if node.domain == "ai.onnx" else node.domain,
        node.op_type,
        getattr(node, "overload", ""),
        tuple(scope.canonical(n) if n else "" for n in node.input),
        attrs,
        tuple(bool(o) for o in node.output),
    )


def _tensor_chunks(tensor: onnx.TensorProto):
    """The tensor's identity as bytes: a tag, then raw bytes (inline or external) or the typed fields.

    Raw and typed encodings get different tags, so equal bytes always mean equal values.
    """
    if is_external(tensor):
        yield b"raw"
        info = external_info(tensor)
        remaining = int(info.get("length", tensor_nbytes(tensor)))
        with open(info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk
    elif tensor.HasField("raw_data"):
        yield b"raw"
        yield tensor.raw_data
    else:
        typed = onnx.TensorProto()
        typed.CopyFrom(tensor)
        typed.ClearField("name")
        typed.ClearField("doc_string")
        yield b"typed"
        yield typed.SerializeToString(deterministic=True)


def _same_bytes(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    """Full comparison after equal hashes, streamed (external data is never read whole)."""
    left, right = _chunks_nonempty(a), _chunks_nonempty(b)
    x = y = memoryview(b"")
    while True:
        if x is not None and not len(x):
            x = next(left, None)
        if y is not None and not len(y):
            y = next(right, None)
        if x is None or y is None:
            return x is None and y is None
        n = min(len(x), len(y))
        if x[:n] != y[:n]:
            return False
        x, y = x[n:], y[n:]


def _chunks_nonempty(tensor: onnx.TensorProto):
    for chunk in _tensor_chunks(tensor):
        if chunk:
            yield memoryview(chunk).cast("B")


# --------------------------------------------------------------------------- rewrite


def _apply(scope: _Scope) -> None:
    """Rename uses (and kept outputs taking graph output names), drop merged nodes and initializers."""
    for i in range(len(scope.nodes)):
        if i not in scope.dropped_nodes:
            for child in scope.children.get(i, ()):
                _apply(child)
    apply_renames(scope.graph, scope.nodes, scope.dropped_nodes, scope.final, [*scope.canon, *scope.display],
                  is_body=scope.parent is not None)
    if scope.dropped_inits:
        filter_field(scope.graph.initializer, lambda t: t.name not in scope.dropped_inits)
