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

:func:`fold_batchnorm` works on one graph and is what quantize calls (option ``fold_batchnorm``).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import STANDARD_DOMAINS, ConstantResolver, GraphIndex, WeightStore
from .base import Pass, PassResult, count
from .fuse_bias import (PRODUCERS, GraphEdit, Layout, Rank, Rewrite, bias_reason, producer_layout, rewrite_graph,
                        run_per_graph, set_gemm_beta_one, write_input)
from .weights import attribute


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul weight and bias before it"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"batchnorms_folded": 0}
        folded = run_per_graph(model, stats, "BatchNormalization", fold_batchnorm)
        return PassResult(model, folded > 0, stats)


def fold_batchnorm(graph: onnx.GraphProto, make_name, opset: int, stats: dict[str, int | float] | None = None,
                   rank: Rank | None = None) -> int:
    """Fold every foldable BatchNormalization of one graph (its bodies are not entered) into its
    producer; how many were folded. Skips are counted into ``stats`` as ``skipped_<reason>``.

    ``rank`` gives value ranks (a MatMul qualifies only with 2-D input); default: declared shapes.
    """
    return rewrite_graph(graph, make_name, opset, stats, rank, "batchnorms_folded", _visit_batchnorm)


def _visit_batchnorm(bn: onnx.NodeProto, i: int, rw: Rewrite) -> bool | str:
    if bn.op_type != "BatchNormalization" or bn.domain not in STANDARD_DOMAINS:
        return False
    return _fold(bn, i, rw.index, rw.store, rw.constants, rw.edit, rw.make_name, rw.opset, rw.rank, rw.stats) or True


def _fold(bn: onnx.NodeProto, i: int, index: GraphIndex, store: WeightStore, constants: ConstantResolver,
          edit: GraphEdit, make_name, opset: int, rank: Rank, stats) -> str | None:
    if any(bn.output[1:]) or attribute(bn, "training_mode", 0):
        return "training_mode"
    if attribute(bn, "spatial", 1) == 0:
        return "not_spatial"
    if len(bn.input) != 5:
        return "malformed"
    p = edit.producer(bn.input[0])
    node = index.nodes[p] if p is not None and p not in edit.dropped else None
    if (node is None or node.op_type not in PRODUCERS or node.domain not in STANDARD_DOMAINS
            or node.output[0] != bn.input[0]):
        return "no_foldable_producer"
    out = bn.input[0]
    if index.is_graph_output(out):
        return "output_is_graph_output"
    if edit.readers(out) != 1:
        return "output_has_other_readers"
    layout = producer_layout(node, constants, opset, rank)
    if isinstance(layout, str):
        return layout
    if edit.readers(layout.weight) != 1 or index.is_graph_output(layout.weight):
        return "shared_weight"
    params = [constants.value(n) for n in bn.input[1:5]]
    if any(x is None for x in params):
        return "outer_scope_parameters" if any(constants.is_outer(n) for n in bn.input[1:5]) else "runtime_parameters"
    if any(x.shape != (layout.channels,) for x in params):
        return "parameter_shape"
    old = layout.bias_name
    old_value = constants.value(old) if old else None
    reason = bias_reason(old, old_value, layout.channels, constants)
    if reason:
        return reason
    gamma, beta, mean, var = (x.astype(np.float64) for x in params)
    with np.errstate(all="ignore"):
        factor = gamma / np.sqrt(var + float(attribute(bn, "epsilon", 1e-5)))
    if not np.isfinite(factor).all():
        return "nonfinite_scale"
    if node.op_type == "Gemm":
        gemm_beta = float(attribute(node, "beta", 1.0))
        base = gemm_beta * old_value.astype(np.float64) if old_value is not None and gemm_beta != 0 else 0.0
        set_gemm_beta_one(node)
    else:
        base = old_value.astype(np.float64) if old_value is not None else 0.0
    store.set_array(layout.weight, _scaled_weight(node, layout, store.array(layout.weight), factor))
    if node.op_type == "MatMul":
        node.op_type = "Gemm"
        count(stats, "matmuls_to_gemm")
    bias = (base - mean) * factor + beta
    write_input(node, 2, bias.astype(layout.dtype), store, edit, make_name, f"{node.name or node.output[0]}_bias")
    edit.take_over(p, bn.output[0])
    edit.remove(i)
    return None


def _scaled_weight(node: onnx.NodeProto, layout: Layout, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """The weight with output channel ``c`` scaled by ``factor[c]`` (float64, back in the weight's dtype)."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        w = w * factor.reshape(-1, *[1] * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":  # (C_in, C_out / group, k...): group g writes channels g*(C_out/group) + j
        groups = int(attribute(node, "group", 1))
        per_group = w.shape[1]
        shaped = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        w = (shaped * factor.reshape(groups, 1, per_group, *[1] * (w.ndim - 2))).reshape(w.shape)
    elif node.op_type == "Gemm" and attribute(node, "transB", 0):
        w = w * factor[:, None]
    else:  # Gemm (K, N) or MatMul (K, N)
        w = w * factor[None, :]
    return w.astype(layout.dtype)
