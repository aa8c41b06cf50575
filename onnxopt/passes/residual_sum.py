"""residual-sum: write the residual Adds that onnxruntime would fuse into SkipLayerNormalization as ``Sum``.

The same values under the standard opset; onnxruntime's CPU provider then keeps Add + LayerNormalization
unfused, and its vectorized LayerNormalization runs where the fused kernel's scalar loop would
(:mod:`onnxopt.residual_sum` says which Adds and why). `quantize` does this by default
(``residual_sum``); this pass gives fp32 models the same: minilm_l3 fp32, 1 thread, one sentence,
0.88x the time (README). Marked exact: ``Sum`` and ``Add`` of two tensors are one function; onnxruntime's
unfused LayerNormalization rounds differently from the fused kernel (a few 1e-6 on minilm_l3), which the
manager's exact gate allows like any other reassociation.
"""

from __future__ import annotations

import onnx

from ..residual_sum import residual_adds_as_sum
from .base import Pass, PassResult


class ResidualSum(Pass):
    name = "residual-sum"
    summary = "residual Adds before a LayerNormalization as Sum: onnxruntime CPU keeps its fast unfused kernels"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        rewritten = residual_adds_as_sum(model)
        return PassResult(model, rewritten > 0, {"residual_sums": rewritten})
