"""fold-batchnorm: fold inference BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul before it, exactly.

``BN(y) = (y - mean) * f + beta`` with ``f = scale / sqrt(var + epsilon)`` per channel (axis 1).
When ``y`` is the output of a producer with a constant weight, read by the BatchNormalization
alone and not a graph output, the producer's weight is scaled by ``f`` per output channel and its
bias becomes ``(b - mean) * f + beta`` (created where there was none):
- Conv: weight rows (axis 0); ConvTranspose: weight axis 1 within each group.
- Gemm: the weight's output axis (0 with transB, else 1); C becomes ``f * (beta_g * C - mean) +
  beta`` with the Gemm's beta set to 1 (alpha and the transposes act on A B only).
- MatMul with a constant 2-D weight: only when its input is 2-D (rank from one shape inference),
  where BatchNormalization's channel axis 1 is the MatMul's last axis; the MatMul then becomes
  Gemm(A, W * f, bias), which is exact for 2-D input and keeps the node count at one (a MatMul
  followed by an Add of the bias would trade the BatchNormalization for an Add). Other ranks are
  skipped and counted: BatchNormalization normalises axis 1, the MatMul's channels are the last.
The producer then writes the BatchNormalization's output; the BatchNormalization and the
parameters only it read are removed here. Arithmetic is float64, written in the weight's dtype
(float16 / bfloat16 included). Skipped: training mode or its extra outputs, ``spatial=0`` (opset
< 9), parameters that are not constants of shape [C], a weight read by another node (scaling it
would change that node; a copy would grow the model), a bias computed at run time.

The rewrite itself, :func:`onnxopt.passes.bias_rewrite.fold_batchnorm`, works on one graph; quantize calls it too
(option ``fold_batchnorm``).
"""

from __future__ import annotations

import onnx

from .base import Pass, PassResult
from .bias_rewrite import fold_batchnorm, run_per_graph


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul weight and bias before it"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"batchnorms_folded": 0}
        folded = run_per_graph(model, stats, "BatchNormalization", fold_batchnorm)
        return PassResult(model, folded > 0, stats)
