"""Residual Adds before a LayerNormalization written as Sum: the same values, and onnxruntime no longer fuses
the pair into its SkipLayerNormalization (whose float CPU kernel is the slow one)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxopt.data import FeedSet
from onnxopt.passes.base import PassContext
from onnxopt.passes.quantize import QuantizePass
from onnxopt.residual_sum import residual_adds_as_sum
from onnxopt.validate import check_interface

from conftest import make_model, tensor, value

HIDDEN = 16


def residual_block(seed=0, opset=17, skip_shape=(1, 8, HIDDEN)):
    """x[1,8,16] -> MatMul -> (+ skip, a constant of ``skip_shape``) -> LayerNorm -> MatMul -> Add bias -> y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "skip"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["o"]),
             helper.make_node("Add", ["o", "bias"], ["y"], name="bias_add")]
    inits = [tensor("w", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)),
             tensor("skip", rng.standard_normal(skip_shape).astype(np.float32)),
             tensor("gamma", rng.standard_normal(HIDDEN).astype(np.float32)),
             tensor("beta", rng.standard_normal(HIDDEN).astype(np.float32)),
             tensor("w2", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)),
             tensor("bias", rng.standard_normal(HIDDEN).astype(np.float32))]
    return make_model(nodes, [value("x", [1, 8, HIDDEN])], [value("y", [1, 8, HIDDEN])], inits, opset=opset)


def optimized_ops(model, tmp_path) -> Counter:
    """Op types of the graph onnxruntime runs at ORT_ENABLE_ALL (its fusions applied)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def outputs(model, feed, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def test_the_add_before_a_layernorm_becomes_sum_and_onnxruntime_no_longer_fuses_it(tmp_path):
    model = residual_block()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert residual_adds_as_sum(rewritten) == 1
    ops = {n.name: n.op_type for n in rewritten.graph.node}
    assert ops["residual"] == "Sum" and ops["bias_add"] == "Add"  # the bias Add reads no LayerNorm: kept
    onnx.checker.check_model(rewritten, full_check=True)
    assert optimized_ops(model, tmp_path)["SkipLayerNormalization"] == 1  # the twin: onnxruntime fuses the Add
    fused = optimized_ops(rewritten, tmp_path)
    assert fused["SkipLayerNormalization"] == 0 and fused["LayerNormalization"] == 1
    feed = {"x": np.random.default_rng(1).standard_normal((1, 8, HIDDEN)).astype(np.float32)}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_allclose(outputs(rewritten, feed, level)[0], outputs(model, feed, level)[0],
                                   rtol=1e-5, atol=1e-5)


def test_adds_onnxruntime_would_not_fuse_are_left_alone(tmp_path):
    """The negative twins: a broadcast skip, an Add read by more than the LayerNorm, inner dims of different
    symbols, an If branch, opset 7 (Sum-6 does not broadcast): onnxruntime fuses none of them (checked where
    it runs), and they stay Add."""
    broadcast = residual_block(skip_shape=(HIDDEN,))
    assert optimized_ops(broadcast, tmp_path)["SkipLayerNormalization"] == 0
    assert residual_adds_as_sum(broadcast) == 0
    shared = residual_block()
    shared.graph.output.append(value("r", [1, 8, HIDDEN]))  # the sum is a graph output too
    assert residual_adds_as_sum(shared) == 0
    symbolic = residual_block()
    symbolic.graph.input[0].CopyFrom(value("x", [1, "seq", HIDDEN]))
    symbolic.graph.initializer.remove(next(t for t in symbolic.graph.initializer if t.name == "skip"))
    symbolic.graph.input.append(value("skip", [1, "other", HIDDEN]))
    assert optimized_ops(symbolic, tmp_path)["SkipLayerNormalization"] == 0
    assert residual_adds_as_sum(symbolic) == 0
    body = residual_block().graph
    branch = helper.make_graph(list(body.node), "branch", [], [value("y", [1, 8, HIDDEN])], list(body.initializer))
    outer = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                       [value("c", [], onnx.TensorProto.BOOL), value("x", [1, 8, HIDDEN])],
                       [value("y", [1, 8, HIDDEN])])
    assert residual_adds_as_sum(outer) == 0
    old = residual_block(opset=7)
    assert residual_adds_as_sum(old) == 0
    assert all(n.op_type == "Add" for g in (broadcast, shared, symbolic, old) for n in g.graph.node
               if n.name == "residual")


@pytest.mark.parametrize("dims", [["batch", 8, HIDDEN], ["batch", "seq", HIDDEN]])
def test_symbolic_dims_onnxruntime_fuses_are_rewritten(tmp_path, dims):
    model = residual_block()
    model.graph.input[0].CopyFrom(value("x", dims))
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "skip"))
    model.graph.input.append(value("skip", dims))
    model.graph.output[0].CopyFrom(value("y", dims))
    assert optimized_ops(model, tmp_path)["SkipLayerNormalization"] == 1
    assert residual_adds_as_sum(model) == 1
    assert optimized_ops(model, tmp_path)["SkipLayerNormalization"] == 0


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), hidden=st.integers(1, 9), lead=st.booleans(), seed=st.integers(0, 2**16))
def test_sum_of_two_inputs_equals_add_under_broadcasting(rows, hidden, lead, seed):
    """The law the rewrite rests on: Sum(a, b) == Add(a, b) bit for bit in onnxruntime, whichever input
    broadcasts."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, rows, hidden)).astype(np.float32)
    b = rng.standard_normal((1, rows, hidden) if lead else (hidden,)).astype(np.float32)
    results = []
    for op in ("Add", "Sum"):
        nodes = [helper.make_node(op, ["a", "b"], ["s"]),
                 helper.make_node("LayerNormalization", ["s", "g"], ["y"], axis=-1, epsilon=1e-3)]
        model = make_model(nodes, [value("a", list(a.shape)), value("b", list(b.shape))], [value("y", None)],
                           [tensor("g", np.ones(hidden, np.float32))])
        results.append(outputs(model, {"a": a, "b": b}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0])
    np.testing.assert_array_equal(results[1], results[0])


def test_quantize_writes_the_residual_sum_unless_told_not_to(tmp_path):
    """quantize's output keeps onnxruntime's fast LayerNormalization; residual_sum=false is the twin that
    onnxruntime fuses into SkipLayerNormalization, with the same values."""
    model = residual_block()
    feeds = FeedSet({"x": np.random.default_rng(2).standard_normal((8, 1, 8, HIDDEN)).astype(np.float32)}, "c")
    results = {flag: QuantizePass(QuantizePass.Options(mode="dynamic", residual_sum=flag),
                                  PassContext(calib=feeds))(residual_block()) for flag in (True, False)}
    assert results[True].stats["residual_sums"] == 1 and "residual_sums" not in results[False].stats
    assert optimized_ops(results[True].model, tmp_path)["SkipLayerNormalization"] == 0
    assert optimized_ops(results[False].model, tmp_path)["SkipLayerNormalization"] == 1
    assert check_interface(model, results[True].model) == []
    feed = {"x": feeds.arrays["x"][0]}
    np.testing.assert_allclose(outputs(results[True].model, feed)[0], outputs(results[False].model, feed)[0],
                               rtol=1e-4, atol=1e-4)
