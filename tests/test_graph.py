import subprocess
import sys

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import InputError
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.graph import (GraphIndex, WeightStore, free_names, model_names, shorten_names, unique_name_factory,
                           walk_graphs)

from conftest import make_model, mlp, run, tensor, value


def test_index_knows_producers_and_consumers():
    index = GraphIndex(mlp().graph)
    assert index.producer_node("r").name == "relu"
    assert [n.name for n in index.consumer_nodes("r")] == ["fc2"]
    assert index.producer_node("x") is None and index.is_graph_output("y")


def test_topological_order_puts_producers_first():
    nodes = [
        helper.make_node("Relu", ["b"], ["c"], name="third"),
        helper.make_node("Neg", ["x"], ["a"], name="first"),
        helper.make_node("Abs", ["a"], ["b"], name="second"),
    ]
    index = GraphIndex(make_model(nodes, [value("x", [1])], [value("c", [1])]).graph)
    assert [index.nodes[i].name for i in index.topological_order()] == ["first", "second", "third"]


def test_cycles_are_reported():
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    index = GraphIndex(make_model(nodes, [value("x", [1])], [value("a", [1])]).graph)
    with pytest.raises(InputError, match="cycle"):
        index.topological_order()


def test_subgraph_outer_references_are_uses_of_the_containing_node():
    body = helper.make_graph([helper.make_node("Add", ["outer", "inner_in"], ["o"])], "body",
                             [value("inner_in", [1])], [value("o", [1])])
    assert free_names(body) == {"outer"}
    nodes = [
        helper.make_node("Neg", ["x"], ["outer"], name="producer"),
        helper.make_node("Identity", ["x"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body, name="if"),
    ]
    model = make_model(nodes, [value("x", [1])], [value("y", [1])])
    index = GraphIndex(model.graph)
    assert [n.name for n in index.consumer_nodes("outer")] == ["if"]
    assert len(list(walk_graphs(model.graph))) == 3


def test_weight_store_sees_initializers_and_constant_nodes_alike():
    nodes = [helper.make_node("Constant", [], ["c"], value=tensor("", np.ones((2, 2), np.float32))),
             helper.make_node("MatMul", ["x", "c"], ["y"])]
    model = make_model(nodes, [value("x", [1, 2])], [value("y", [1, 2])], [tensor("i", np.zeros(3, np.float32))])
    store = WeightStore(model.graph)
    assert set(store.names()) == {"i", "c"} and store.is_constant_node("c")
    store.set_array("c", np.full((2, 2), 3, np.float32))
    store.set_array("i", np.ones(3, np.float32))
    fresh = WeightStore(model.graph)
    assert fresh.array("c").tolist() == [[3, 3], [3, 3]] and fresh.array("i").tolist() == [1, 1, 1]


def test_initializers_that_are_graph_inputs_are_not_weights():
    model = mlp()
    model.graph.input.append(value("w1", [16, 8]))
    assert "w1" not in WeightStore(model.graph)


def test_unique_names_avoid_every_existing_name():
    make = unique_name_factory(mlp())
    assert make("w1") == "w1_1" and make("w1") == "w1_2" and make("fresh") == "fresh"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "onnxopt", "passes"], capture_output=True, text=True)
    assert result.returncode == 0 and "dce" in result.stdout


def test_infer_shapes_on_the_skeleton_matches_onnx_and_leaves_the_model_alone():
    """Big weights go to shape inference as dims only: the same shapes, the caller's model unchanged."""
    from onnxopt.graph import SHAPE_ONLY_BYTES, infer_shapes

    big = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")  # above SHAPE_ONLY_BYTES
    assert big.ByteSize() > SHAPE_ONLY_BYTES
    shape = numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape")
    then = helper.make_graph([helper.make_node("Relu", ["m"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["r"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((2, 4, 8), np.float32))),
             helper.make_node("Add", ["r", "c"], ["y"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [big, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    ours, theirs = infer_shapes(model, data_prop=True), onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert model.SerializeToString() == before
    assert list(ours.graph.value_info) == list(theirs.graph.value_info) and list(ours.graph.output) == list(
        theirs.graph.output)
    assert [d.dim_value for d in ours.graph.output[0].type.tensor_type.shape.dim] == [2, 4, 8]


NAME_PARTS = st.sampled_from(["_0", "_1", "_a", "_10", "v", "w", "tmp", "_", "0"])  # never x or y (the interface)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(NAME_PARTS, min_size=1, max_size=3).map("".join), min_size=6, max_size=6, unique=True),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_shortened_names_are_unique_keep_the_kept_and_compute_the_same(names, kept_flags):
    """A chain x -> Add(c0) -> Neg -> Add(c1) -> Relu -> y with arbitrary value names (some already of the
    short form): whatever is not kept gets a short name, nothing collides, and onnxruntime computes the same."""
    a, c0, b, c, c1, d = names
    nodes = [helper.make_node("Add", ["x", c0], [a], name="add0"), helper.make_node("Neg", [a], [b]),
             helper.make_node("Add", [b, c1], [c]), helper.make_node("Relu", [c], [d]),
             helper.make_node("Identity", [d], ["y"])]
    rng = np.random.default_rng(0)
    model = make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3])],
                       [tensor(c0, rng.standard_normal(3).astype(np.float32)),
                        tensor(c1, rng.standard_normal(3).astype(np.float32))])
    kept = {n for n, k in zip(names, kept_flags) if k}
    before = run(model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    renamed = shorten_names(model, kept)
    after_names = model_names(model)
    onnx.checker.check_model(model)
    assert renamed == len(set(names) - kept) and kept <= after_names and {"x", "y"} <= after_names
    assert len(after_names) == len(set(names)) + 2  # unique: no two values merged
    assert all(n in kept or n in ("x", "y") or (n.startswith("_") and len(n) <= 2) for n in after_names)
    assert model.graph.node[0].name == "add0"  # node names are not values
    np.testing.assert_array_equal(run(model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})[0], before[0])


def test_shortened_names_reach_into_bodies_and_leave_the_interface():
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "long_outer_value"], ["then_long_out"])], "then", [],
                                    [value("then_long_out", [2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["else_long_out"])], "else", [],
                                    [value("else_long_out", [2])])
    nodes = [helper.make_node("Abs", ["x"], ["long_outer_value"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [value("x", [2]), value("cond", [], TensorProto.BOOL)], [value("y", [2])])
    feed = {"x": np.array([-1.0, 2.0], np.float32), "cond": np.array(True)}
    before = run(model, feed)
    assert shorten_names(model, set()) == 3
    onnx.checker.check_model(model)
    assert [v.name for v in model.graph.input] == ["x", "cond"] and model.graph.output[0].name == "y"
    assert "long_outer_value" not in model_names(model)
    np.testing.assert_array_equal(run(model, feed)[0], before[0])
