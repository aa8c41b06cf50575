"""dce: remove nodes whose outputs reach no graph output, and what only they used.

Liveness runs backwards from the graph outputs through a producer map built once. Subgraphs
are cleaned first (inner before outer) so that an outer value read only by a dead node inside
an If/Loop body also dies. Graph inputs and outputs are never removed.
"""

from __future__ import annotations

import onnx

from ..graph import defined_names, filter_field, node_subgraphs, node_uses, replace_nodes
from .base import Pass, PassResult, count


class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove nodes, initializers, value_info and local functions that no graph output needs"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {
            "nodes_removed": 0, "initializers_removed": 0, "value_info_removed": 0, "functions_removed": 0,
        }
        _eliminate(model.graph, stats)
        stats["functions_removed"] = _drop_unused_functions(model)
        modified = any(stats[k] for k in ("nodes_removed", "initializers_removed", "value_info_removed",
                                            "functions_removed"))
        return PassResult(model, modified, stats)


def _eliminate(graph: onnx.GraphProto, stats: dict[str, int | float]) -> None:
    # One sweep: a producer map, and inner graphs cleaned first (their outer reads may shrink).
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            producer[out] = i
        if node.attribute:
            for sub in node_subgraphs(node):
                count(stats, "subgraphs_visited")
                _eliminate(sub, stats)
    live_names = {o.name for o in graph.output}
    live_nodes: set[int] = set()
    stack = list(live_names)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in live_nodes:
            continue
        live_nodes.add(i)
        for name in node_uses(nodes[i]):  # a node's uses are read only once it is found live
            if name not in live_names:
                live_names.add(name)
                stack.append(name)
    if len(live_nodes) < len(nodes):
        stats["nodes_removed"] += len(nodes) - len(live_nodes)
        replace_nodes(graph, (n for i, n in enumerate(nodes) if i in live_nodes))
    keep = live_names | {i.name for i in graph.input}
    stats["initializers_removed"] += filter_field(graph.initializer, lambda t: t.name in keep)
    stats["initializers_removed"] += filter_field(graph.sparse_initializer, lambda t: t.values.name in keep)
    if graph.value_info:
        present = defined_names(graph) | live_names
        stats["value_info_removed"] += filter_field(graph.value_info, lambda v: v.name in present)


def _drop_unused_functions(model: onnx.ModelProto) -> int:
    """Local functions called by no node (directly or through another used function)."""
    functions = {(f.domain, f.name): f for f in model.functions}
    if not functions:
        return 0
    from ..graph import walk_nodes

    used: set[tuple[str, str]] = set()
    stack = [(n.domain, n.op_type) for n in walk_nodes(model.graph)]
    while stack:
        key = stack.pop()
        if key in functions and key not in used:
            used.add(key)
            stack.extend((n.domain, n.op_type) for n in functions[key].node)
    before = len(model.functions)
    filter_field(model.functions, lambda f: (f.domain, f.name) in used)
    return before - len(model.functions)
