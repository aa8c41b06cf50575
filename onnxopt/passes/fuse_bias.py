"""fuse-bias: an Add of a per-channel constant after a Conv / Gemm / MatMul becomes that node's bias, exactly.

Patterns, the producer's output read by the Add alone and not a graph output:
- Conv / ConvTranspose with a constant weight, plus a constant that holds one value per output
  channel ([C,1,1], [1,C,1,1], [C,1], [1], a scalar: axis 1 of the output, 1 on every other axis,
  rank at most the output's) -> the bias B (created, or B + constant).
- Gemm with a constant B, plus a constant that varies along the last axis only ([N], [1,N], [1], a
  scalar) -> C := beta * C + constant as a 1-D [N] (or C's own shape), beta := 1; alpha and the
  transposes are untouched (they do not act on C).
- MatMul with a constant 2-D weight and a 2-D input (rank from one shape inference of the model),
  plus such a constant -> Gemm(A, W, constant). An N-D MatMul is left as it is, and counted
  (``skipped_matmul_not_2d``): onnxruntime fuses MatMul + Add itself.
A constant is an initializer that is not a graph input (those can be overridden), a Constant node,
or a small chain of Reshape / Unsqueeze / Squeeze / Flatten / Identity / Cast over those, evaluated
by the ONNX reference (paddle exports a Conv bias as ``Add(Conv, Reshape(Constant))``).

The producer then writes the Add's output (graph outputs keep their names). The Add goes, and so
do the constants only it read (the Reshape, its Constant inputs, initializers): removed here, not
left to dce. A bias read by this node alone is changed in place, else a new initializer is made.
Sums are computed in float64 and written in the weight's dtype (float16 / bfloat16 included).

The rewrite itself lives in :mod:`onnxopt.passes.bias_rewrite`, shared with fold-batchnorm and quantize.
"""

from __future__ import annotations

import onnx

from .base import Pass, PassResult
from .bias_rewrite import fuse_bias, run_per_graph


class FuseBias(Pass):
    name = "fuse-bias"
    summary = "fold an Add of a per-channel constant after Conv/Gemm (and 2-D MatMul -> Gemm) into the bias"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"biases_fused": 0}
        return PassResult(model, run_per_graph(model, stats, "Add", fuse_bias) > 0, stats)
