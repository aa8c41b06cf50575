"""lift-constants: turn Constant-node tensors into initializers, for tools that only look at initializers."""

from __future__ import annotations

import onnx

from ..graph import constant_tensor, replace_nodes, walk_graphs
from .base import Pass, PassResult, count


class LiftConstants(Pass):
    name = "lift-constants"
    summary = "move tensors of Constant nodes into initializers (same names, same values)"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"constants_lifted": 0}
        if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
            stats["skipped_ir_version_below_4"] = 1
            return PassResult(model, False, stats)
        for graph in walk_graphs(model.graph):
            outputs = {o.name for o in graph.output}
            kept, lifted = [], []
            for node in graph.node:
                tensor = constant_tensor(node)
                if tensor is None:
                    if node.op_type == "Constant":
                        count(stats, "skipped_sparse_or_string_constant")
                    kept.append(node)
                elif node.output[0] in outputs:
                    count(stats, "skipped_graph_output")  # an initializer may not double as a graph output
                    kept.append(node)
                else:
                    init = onnx.TensorProto()
                    init.CopyFrom(tensor)
                    init.name = node.output[0]
                    lifted.append(init)
            if lifted:
                replace_nodes(graph, kept)
                graph.initializer.extend(lifted)
                stats["constants_lifted"] += len(lifted)
        return PassResult(model, stats["constants_lifted"] > 0, stats)
