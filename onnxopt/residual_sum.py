"""Residual additions before a LayerNormalization written as ``Sum``, so onnxruntime keeps its fast kernels.

At load, onnxruntime's CPU provider fuses ``Add`` (two 3-D inputs of one shape) + ``LayerNormalization`` into
its ``SkipLayerNormalization``. That kernel's float path (onnxruntime 1.32, contrib_ops/cpu/skip_layer_norm.cc)
is a scalar loop with a division per element: 127-133 us for one 1x64x384 pair here, where the unfused pair
(Add, then onnxruntime's vectorized LayerNormalization) takes 19.5 us. The sentence encoder minilm_l3 has seven
of them: 1.08 of its 3.17 ms of int8 kernels. ``Sum`` of two inputs is the same function under the standard
opset (multidirectional broadcasting since opset 8) and no fusion matches it, so the pair stays unfused; the
rest of the graph fuses as before. Only the Adds onnxruntime would fuse are rewritten (its condition, from
skip_layer_norm_fusion.cc and checked on 1.32: the LayerNormalization is the Add's only reader, both inputs
3-D of one shape, dims equal as numbers or as symbols): elsewhere Add stays, as fast as Sum or a little faster.
"""

from __future__ import annotations

from collections import Counter

import onnx

from .graph import STANDARD_DOMAINS, opset_version, value_shapes

SUM_BROADCASTS_SINCE = 8  # Sum-6 requires equal shapes; Add always broadcast


def residual_adds_as_sum(model: onnx.ModelProto) -> int:
    """Rewrite each ``Add`` of the main graph that onnxruntime would fuse with the LayerNormalization reading
    it into ``Sum`` with the same inputs and output (the same values); return how many. Subgraphs are left as
    they are, and everything below opset 8."""
    if opset_version(model) < SUM_BROADCASTS_SINCE:
        return 0
    graph = model.graph
    normalized = {node.input[0] for node in graph.node
                  if node.op_type == "LayerNormalization" and node.domain in STANDARD_DOMAINS and node.input}
    readers = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    candidates = [node for node in graph.node
                  if node.op_type == "Add" and node.domain in STANDARD_DOMAINS and node.output[0] in normalized
                  and readers[node.output[0]] == 1 and node.output[0] not in outputs]
    if not candidates:
        return 0
    shapes = value_shapes(model)
    rewritten = 0
    for node in candidates:
        if _fused_by_onnxruntime(shapes.get(node.input[0]), shapes.get(node.input[1])):
            node.op_type = "Sum"
            rewritten += 1
    return rewritten


def _fused_by_onnxruntime(first: tuple | None, second: tuple | None) -> bool:
    """onnxruntime's SkipLayerNormFusion condition on the Add's input shapes: both 3-D, each dim the same number
    or the same symbol on both (onnxruntime 1.32 fuses [1, seq, 384] + [1, seq, 384]; checked in the tests)."""
    if first is None or second is None or len(first) != 3 or len(second) != 3:
        return False
    return all(isinstance(a, (int, str)) and a == b for a, b in zip(first, second))
