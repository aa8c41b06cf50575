"""Laws every registered pass obeys, whatever it does: checker-valid output, unchanged interface,
and (for exact passes) unchanged outputs. New passes are covered by being registered."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxopt.data import FeedSet
from onnxopt.passes.base import PassContext
from onnxopt.registry import PASSES
from onnxopt.validate import check_interface, check_structure

from conftest import assert_same_outputs, make_model, tensor, value


@st.composite
def small_networks(draw):
    """Random MLPs and CNNs: Gemm/MatMul/Conv layers with biases, activations, a dead branch, and (MLPs)
    a constant subexpression and a repeated node."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        widths = [6] + draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)) + [3]
        nodes, inits, x = [], [], "x"
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            inits += [tensor(f"w{i}", rng.standard_normal((a, b)).astype(np.float32)),
                      tensor(f"b{i}", rng.standard_normal(b).astype(np.float32))]
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}")]
            x = f"a{i}"
            if i < len(widths) - 2:
                act = draw(st.sampled_from(["Relu", "Sigmoid", "Tanh"]))
                nodes.append(helper.make_node(act, [x], [f"h{i}"], name=f"act{i}"))
                x = f"h{i}"
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
        nodes.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
        if draw(st.booleans()):  # work for the clean-ups: a bias computed from constants, a repeated dead node
            half = numpy_helper.to_array(inits[1]) / 2  # halves add back exactly
            inits[1] = tensor("b0_half", half)
            nodes.insert(0, helper.make_node("Add", ["b0_half", "b0_half"], ["b0"], name="bias_from_halves"))
            nodes.append(helper.make_node("Neg", ["x"], ["dead_again"], name="dead_again"))
        return make_model(nodes, [value("x", ["batch", 6])], [value("y", ["batch", 3])], inits)
    channels = draw(st.integers(2, 8))
    inits = [tensor("cw", rng.standard_normal((channels, 2, 3, 3)).astype(np.float32)),
             tensor("cb", rng.standard_normal(channels).astype(np.float32)),
             tensor("fw", rng.standard_normal((4, channels * 16)).astype(np.float32)),
             tensor("fb", rng.standard_normal(4).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc")]
    return make_model(nodes, [value("x", ["batch", 2, 8, 8])], [value("y", ["batch", 4])], inits)


def calibration_for(model: onnx.ModelProto) -> FeedSet:
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return FeedSet({"x": np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)}, "calib")


@pytest.mark.parametrize("name", sorted(PASSES))
@settings(max_examples=8, deadline=None)
@given(model=small_networks())
def test_every_pass_keeps_the_model_valid_and_its_interface(name, model):
    original = onnx.ModelProto()
    original.CopyFrom(model)
    calib = calibration_for(model)
    result = PASSES[name](None, PassContext(calib=calib, teacher=lambda: original))(model)
    assert check_structure(result.model) is None
    assert check_interface(original, result.model) == []
    assert all(isinstance(v, (int, float)) for v in result.stats.values())
    if PASSES[name].exact:
        assert_same_outputs(original, result.model, {"x": calib.arrays["x"][:3]})
