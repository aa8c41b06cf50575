import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.lift_constants import LiftConstants
from onnxopt.validate import check_structure

from conftest import assert_same_outputs, feeds_for, make_model, mlp, tensor, value


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def test_dce_removes_dead_branch_and_its_weight():
    model = mlp(with_dead_branch=True)
    result = DeadCodeElimination()(copy(model))
    assert result.modified
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 1, "value_info_removed": 0,
                            "functions_removed": 0}
    assert [n.name for n in result.model.graph.node] == ["fc1", "relu", "fc2", "bias2"]
    assert "w_dead" not in {t.name for t in result.model.graph.initializer}
    assert_same_outputs(model, result.model, feeds_for(model))


def test_dce_leaves_live_graph_alone():
    model = mlp()
    result = DeadCodeElimination()(copy(model))
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()


def test_dce_keeps_unused_graph_inputs_and_overridable_initializers():
    model = mlp()
    model.graph.input.append(value("unused", [1]))
    model.graph.input.append(value("w_default", [2]))
    model.graph.initializer.append(tensor("w_default", np.zeros(2, np.float32)))
    result = DeadCodeElimination()(model)
    assert {v.name for v in result.model.graph.input} == {"x", "unused", "w_default"}
    assert "w_default" in {t.name for t in result.model.graph.initializer}


def _if_model(outer_use_in_branch: bool):
    """An If whose then-branch reads an outer value computed by a node that is otherwise unused."""
    then_out = "outer" if outer_use_in_branch else "x"
    then_branch = helper.make_graph(
        [helper.make_node("Neg", [then_out], ["t"])], "then", [], [value("t", [2])])
    else_branch = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"]), helper.make_node("Relu", ["x"], ["dead_inner"])],
        "else", [], [value("e", [2])])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["outer"], name="outer_producer"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    return make_model(nodes, [value("x", [2])], [value("y", [2])], [tensor("zero", np.float32(0))])


def test_dce_counts_outer_scope_uses_inside_subgraphs():
    model = _if_model(outer_use_in_branch=True)
    result = DeadCodeElimination()(copy(model))
    names = {n.name for n in result.model.graph.node}
    assert "outer_producer" in names
    assert result.stats["nodes_removed"] == 1  # only the dead Relu inside the else branch
    assert result.stats["subgraphs_visited"] == 2
    for x in (np.array([1, 2], np.float32), np.array([-1, -2], np.float32)):
        assert_same_outputs(model, result.model, {"x": x[None]})


def test_dce_removes_outer_value_no_branch_reads():
    model = _if_model(outer_use_in_branch=False)
    result = DeadCodeElimination()(copy(model))
    assert "outer_producer" not in {n.name for n in result.model.graph.node}
    assert result.stats["nodes_removed"] == 2


def test_dce_drops_unused_local_functions_only():
    def function(name, op):
        return helper.make_function("local", name, ["a"], ["b"], [helper.make_node(op, ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)])

    nodes = [helper.make_node("Used", ["x"], ["y"], domain="local")]
    model = make_model(nodes, [value("x", [2])], [value("y", [2])],
                       functions=[function("Used", "Relu"), function("Unused", "Neg")])
    model.opset_import.append(helper.make_opsetid("local", 1))
    result = DeadCodeElimination()(model)
    assert [f.name for f in result.model.functions] == ["Used"]
    assert result.stats["functions_removed"] == 1


def test_dce_drops_value_info_of_removed_values():
    model = mlp(with_dead_branch=True)
    model.graph.value_info.extend([value("dead1", ["batch", 3]), value("r", ["batch", 16])])
    result = DeadCodeElimination()(model)
    assert [v.name for v in result.model.graph.value_info] == ["r"]
    assert result.stats["value_info_removed"] == 1


def test_lift_constants_moves_constant_tensors_to_initializers():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=tensor("", w)),
        helper.make_node("Constant", [], ["k"], value_float=2.0),
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Mul", ["m", "k"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [1, 2])], [value("y", [1, 3])])
    result = LiftConstants()(copy(model))
    assert result.stats == {"constants_lifted": 2}
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Mul"]
    assert {t.name for t in result.model.graph.initializer} == {"w", "k"}
    assert_same_outputs(model, result.model, feeds_for(model))


def test_lift_constants_skips_constant_that_is_a_graph_output():
    nodes = [helper.make_node("Constant", [], ["y"], value_float=1.0)]
    model = make_model(nodes, [], [value("y", [])])
    result = LiftConstants()(model)
    assert not result.modified
    assert result.stats == {"constants_lifted": 0, "skipped_graph_output": 1}


OPS = {"Relu": 1, "Neg": 1, "Sigmoid": 1, "Add": 2, "Mul": 2}


@st.composite
def random_graphs(draw):
    """Random DAGs over one input: each node reads earlier values; some outputs are chosen as graph outputs."""
    n = draw(st.integers(1, 25))
    values = ["x"]
    nodes = []
    for i in range(n):
        op = draw(st.sampled_from(sorted(OPS)))
        inputs = [draw(st.sampled_from(values)) for _ in range(OPS[op])]
        nodes.append(helper.make_node(op, inputs, [f"v{i}"], name=f"n{i}"))
        values.append(f"v{i}")
    outputs = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3, unique=True))
    return make_model(nodes, [value("x", [3])], [value(o, [3]) for o in outputs])


@settings(max_examples=40, deadline=None)
@given(random_graphs())
def test_dce_never_changes_outputs_and_is_idempotent(model):
    once = DeadCodeElimination()(copy(model)).model
    assert check_structure(once) is None
    assert_same_outputs(model, once, {"x": np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)})
    twice = DeadCodeElimination()(copy(once))
    assert not twice.modified
    assert twice.model.SerializeToString() == once.SerializeToString()


def test_lift_constants_leaves_models_before_ir_4_alone():
    """Before IR 4 an initializer must also be a graph input: lifting would need new inputs."""
    nodes = [helper.make_node("Constant", [], ["k"], value_float=2.0), helper.make_node("Mul", ["x", "k"], ["y"])]
    model = make_model(nodes, [value("x", [1])], [value("y", [1])], opset=9)
    model.ir_version = 3
    result = LiftConstants()(model)
    assert not result.modified and result.stats == {"constants_lifted": 0, "skipped_ir_version_below_4": 1}
