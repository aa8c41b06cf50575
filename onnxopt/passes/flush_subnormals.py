"""flush-subnormals: set subnormal weight values (non-zero, below the smallest normal) to zero.

Exported models carry float32 weights below 1.1754944e-38 (digits_mlp: 291, digits_cnn: 2,504);
x86 CPUs take a microcode assist on every multiply with one, so a Gemm holding a few runs ~20x
slower (digits_mlp's: 168 us instead of ~8; README: the whole models at batch 1 and 540). onnxruntime's
denormals-as-zero option does not reach the single-threaded path, so the weights themselves are fixed.

Exact: a subnormal weight adds less than 1.2e-38 x its activation to any sum, far below the
rounding of any non-subnormal float32 result, so onnxruntime computes the same outputs (a model
dividing by a subnormal weight would change; the manager's exact gate validates the step like any
other exact pass and rejects it then). The sign is kept: a negative subnormal becomes -0.0.

Flushed: float32, bfloat16 (float32's exponent range) and float64 (below 2.2e-308), tested on the
bit pattern (exponent bits all zero, mantissa not). float16 is skipped and counted: its subnormals
(6e-8 .. 6.1e-5) are real values that fp16 arithmetic keeps, and CPU kernels widen them to normal
float32 anyway. Initializers (graph-input defaults included) and Constant-node tensors, in every
graph (If / Loop / Scan bodies too); external tensors are read one at a time and rewritten through
the spill file, and only tensors that hold a subnormal are rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import STANDARD_DOMAINS, walk_graphs
from ..tensors import SUBNORMAL_LAYOUTS, flush_subnormal_values, set_tensor_array, tensor_to_array
from .base import Pass, PassResult, count

class FlushSubnormals(Pass):
    name = "flush-subnormals"
    summary = "set subnormal float32/bfloat16/float64 weights to zero (sign kept): slow on x86, below any float32 sum"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"tensors_flushed": 0, "values_flushed": 0}
        for graph in walk_graphs(model.graph):
            for tensor in graph.initializer:
                self._flush(tensor, stats)
            if graph.sparse_initializer:
                count(stats, "skipped_sparse_initializer", len(graph.sparse_initializer))
            for node in graph.node:
                if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                    self._flush_constant(node, stats)
        return PassResult(model, stats["values_flushed"] > 0, stats)

    def _flush(self, tensor: onnx.TensorProto, stats: dict[str, int | float]) -> None:
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            count(stats, "skipped_float16")
        if tensor.data_type not in SUBNORMAL_LAYOUTS:
            return
        array, flushed = flush_subnormal_values(tensor_to_array(tensor), tensor.data_type)
        if flushed:
            set_tensor_array(tensor, array)
            _counted(stats, flushed)

    def _flush_constant(self, node: onnx.NodeProto, stats: dict[str, int | float]) -> None:
        """A ``value`` tensor is flushed in place; ``value_float(s)`` are float32 lists rewritten as floats."""
        for attr in node.attribute:
            if attr.name == "value":
                self._flush(attr.t, stats)
            elif attr.name in ("value_float", "value_floats"):
                values = np.array(attr.f if attr.name == "value_float" else attr.floats, dtype=np.float32)
                flushed_values, flushed = flush_subnormal_values(values, onnx.TensorProto.FLOAT)
                if flushed:
                    if attr.name == "value_float":
                        attr.f = float(flushed_values)
                    else:
                        attr.floats[:] = flushed_values.tolist()
                    _counted(stats, flushed)


def _counted(stats: dict[str, int | float], flushed: int) -> None:
    count(stats, "tensors_flushed")
    count(stats, "values_flushed", flushed)
