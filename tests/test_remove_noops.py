from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.modelio import load_model
from onnxopt.passes.remove_noops import RemoveNoops
from onnxopt.validate import check_interface

from conftest import SHARED_MODELS, assert_identical, feeds_for, make_model, run, tensor, value

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
INT64_MAX = np.iinfo(np.int64).max


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def remove(model):
    """Run the pass on a copy; check the laws every run must keep; return the result."""
    result = RemoveNoops()(copy(model))
    onnx.checker.check_model(result.model, full_check=True)
    assert check_interface(model, result.model) == []
    again = RemoveNoops()(copy(result.model))
    assert not again.modified, again.stats
    assert again.model.SerializeToString() == result.model.SerializeToString()
    return result


def shaped(model, feed):
    """Give the graph outputs the shapes one run produces (the full checker wants a shape on each)."""
    for out, array in zip(model.graph.output, run(model, feed)):
        out.type.tensor_type.shape.Clear()
        for d in array.shape:
            out.type.tensor_type.shape.dim.add().dim_value = d
    return model


def ints(name, values):
    return tensor(name, np.array(values, np.int64))


# x: float [2, 3, 4] with -0.0, 0.0, inf and nan among its values; t = <node>(x); y = Neg(t).
X = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
X[0, 0, :3] = [-0.0, np.inf, np.nan]


def kind_model(node, inits=()):
    nodes = [node, helper.make_node("Neg", ["t"], ["y"])]
    return make_model(nodes, [value("x", [2, 3, 4])], [value("y", [2, 3, 4])], list(inits))


NOOPS = {
    "identity": (helper.make_node("Identity", ["x"], ["t"]), []),
    "dropout": (helper.make_node("Dropout", ["x", "ratio"], ["t"]), [tensor("ratio", np.float32(0.3))]),
    "dropout_unused_mask": (helper.make_node("Dropout", ["x"], ["t", "mask"]), []),
    "dropout_constant_false": (helper.make_node("Dropout", ["x", "ratio", "train"], ["t"]),
                               [tensor("ratio", np.float32(0.3)), tensor("train", np.array(False))]),
    "cast": (helper.make_node("Cast", ["x"], ["t"], to=TensorProto.FLOAT), []),
    "castlike": (helper.make_node("CastLike", ["x", "like"], ["t"]), [tensor("like", np.float32(1))]),
    "reshape": (helper.make_node("Reshape", ["x", "s"], ["t"]), [ints("s", [2, 3, 4])]),
    "reshape_copy_and_infer": (helper.make_node("Reshape", ["x", "s"], ["t"]), [ints("s", [0, -1, 4])]),
    "transpose": (helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 2]), []),
    "squeeze_nothing": (helper.make_node("Squeeze", ["x"], ["t"]), []),
    "expand": (helper.make_node("Expand", ["x", "s"], ["t"]), [ints("s", [3, 1])]),
    "pad": (helper.make_node("Pad", ["x", "p"], ["t"], mode="reflect"), [ints("p", [0] * 6)]),
    "slice_whole": (helper.make_node("Slice", ["x", "st", "en", "ax"], ["t"]),
                    [ints("st", [0, -10]), ints("en", [INT64_MAX, 4]), ints("ax", [1, -1])]),
    "concat_one": (helper.make_node("Concat", ["x"], ["t"], axis=1), []),
    "add_negative_zero": (helper.make_node("Add", ["x", "z"], ["t"]), [tensor("z", np.full((3, 1), -0.0, np.float32))]),
    "add_zero_first": (helper.make_node("Add", ["z", "x"], ["t"]), [tensor("z", np.float32(-0.0))]),
    "sub_zero": (helper.make_node("Sub", ["x", "z"], ["t"]), [tensor("z", np.zeros(4, np.float32))]),
    "mul_one": (helper.make_node("Mul", ["x", "one"], ["t"]), [tensor("one", np.ones((2, 1, 4), np.float32))]),
    "mul_one_first": (helper.make_node("Mul", ["one", "x"], ["t"]), [tensor("one", np.float32(1))]),
    "div_one": (helper.make_node("Div", ["x", "one"], ["t"]), [tensor("one", np.ones(1, np.float32))]),
}


@pytest.mark.parametrize("case", sorted(NOOPS))
def test_each_noop_kind_is_removed(case):
    node, inits = NOOPS[case]
    model = kind_model(node, inits)
    result = remove(model)
    assert result.stats["nodes_removed"] == 1 and result.stats[f"removed_{node.op_type}"] == 1
    assert [(n.op_type, list(n.input)) for n in result.model.graph.node] == [("Neg", ["x"])]
    assert not any(k.startswith("skipped_") for k in result.stats)
    assert_identical(model, result.model, {"x": X})


def test_integer_add_of_zero_is_removed():
    nodes = [helper.make_node("Add", ["x", "z"], ["t"]), helper.make_node("Neg", ["t"], ["y"])]
    model = make_model(nodes, [value("x", [2, 3], TensorProto.INT64)], [value("y", [2, 3], TensorProto.INT64)],
                       [tensor("z", np.zeros(3, np.int64))])
    result = remove(model)
    assert result.stats == {"nodes_removed": 1, "removed_Add": 1}
    assert_identical(model, result.model, {"x": np.arange(-3, 3, dtype=np.int64).reshape(2, 3)})


# Near misses: one step from a no-op, so each must stay (and the undecidable ones say why).
NEAR = {
    "cast_to_float16": (helper.make_node("Cast", ["x"], ["t"], to=TensorProto.FLOAT16), [], None),
    "reshape_changes_shape": (helper.make_node("Reshape", ["x", "s"], ["t"]), [ints("s", [3, 2, 4])], None),
    "reshape_changes_rank": (helper.make_node("Reshape", ["x", "s"], ["t"]), [ints("s", [0, -1])], None),
    "transpose_swaps": (helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), [], None),
    "squeeze_removes_a_one": (helper.make_node("Squeeze", ["x"], ["t"]), [], None, (2, 1, 4)),
    "expand_grows_rank": (helper.make_node("Expand", ["x", "s"], ["t"]), [ints("s", [2, 1, 1, 1])], None),
    "expand_grows_dim": (helper.make_node("Expand", ["x", "s"], ["t"]), [ints("s", [2, 3, 4])], None, (2, 1, 4)),
    "pad_one": (helper.make_node("Pad", ["x", "p"], ["t"]), [ints("p", [0, 0, 0, 0, 0, 1])], None),
    "slice_from_one": (helper.make_node("Slice", ["x", "st", "en"], ["t"]), [ints("st", [1]), ints("en", [9])], None),
    "slice_short_end": (helper.make_node("Slice", ["x", "st", "en", "ax"], ["t"]),
                        [ints("st", [0]), ints("en", [3]), ints("ax", [2])], None),
    "slice_reversed": (helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["t"]),
                       [ints("st", [-1]), ints("en", [-INT64_MAX]), ints("ax", [2]), ints("sp", [-1])], None),
    "add_positive_zero": (helper.make_node("Add", ["x", "z"], ["t"]), [tensor("z", np.float32(0))], "signed_zero"),
    "sub_negative_zero": (helper.make_node("Sub", ["x", "z"], ["t"]), [tensor("z", np.float32(-0.0))],
                          "signed_zero"),
    "sub_from_zero": (helper.make_node("Sub", ["z", "x"], ["t"]), [tensor("z", np.float32(0))], None),
    "mul_two": (helper.make_node("Mul", ["x", "c"], ["t"]), [tensor("c", np.float32(2))], None),
    "mul_one_broadcasts": (helper.make_node("Mul", ["x", "one"], ["t"]),
                           [tensor("one", np.ones((2, 2, 3, 4), np.float32))], "broadcast"),
    "mul_one_grows_dim": (helper.make_node("Mul", ["x", "one"], ["t"]),
                          [tensor("one", np.ones((2, 3, 1), np.float32))], "broadcast", (2, 1, 1)),
    "div_by_one_first": (helper.make_node("Div", ["one", "x"], ["t"]), [tensor("one", np.float32(1))], None),
    "dropout_mask_used": (helper.make_node("Dropout", ["x"], ["t", "mask"]), [], "dropout_mask_used"),
}


@pytest.mark.parametrize("case", sorted(NEAR))
def test_near_misses_are_kept(case):
    node, inits, reason, *shape = NEAR[case]
    x_shape = shape[0] if shape else (2, 3, 4)
    nodes = [node]
    outputs = [value("t", None, TensorProto.FLOAT16 if case == "cast_to_float16" else TensorProto.FLOAT)]
    if case == "dropout_mask_used":
        nodes.append(helper.make_node("Not", ["mask"], ["nm"]))
        outputs.append(value("nm", None, TensorProto.BOOL))
    x = X if x_shape == (2, 3, 4) else np.arange(np.prod(x_shape), dtype=np.float32).reshape(x_shape)
    model = shaped(make_model(nodes, [value("x", list(x_shape))], outputs, inits), {"x": x})
    result = remove(model)
    assert not result.modified
    assert result.stats == ({"nodes_removed": 0} if reason is None else {"nodes_removed": 0, f"skipped_{reason}": 1})
    assert_identical(model, result.model, {"x": x})


def test_undecidable_cases_are_skipped_with_a_reason():
    nodes = [
        helper.make_node("Reshape", ["x", "shape_in"], ["r"]),  # shape not constant
        helper.make_node("Dropout", ["x", "", "train"], ["d"]),  # training mode decided at run time
        helper.make_node("Mul", ["x", "one"], ["m"]),  # [3] against [batch, 1]: broadcasts
        helper.make_node("Squeeze", ["u"], ["q"]),  # batch may be 1
        helper.make_node("Squeeze", ["x"], ["q2"]),  # has a 1: not a no-op, no reason needed
        helper.make_node("Reshape", ["u", "s"], ["r2"]),  # -1 next to a symbolic dimension
        helper.make_node("Reshape", ["x", "s2"], ["r3"]),  # [batch, 1] -> [-1, 1]: a no-op
        helper.make_node("Sum", ["d", "m"], ["y"]),
    ]
    model = make_model(nodes, [value("x", ["batch", 1]), value("u", ["batch", 3]),
                               value("shape_in", [2], TensorProto.INT64), value("train", [], TensorProto.BOOL)],
                       [value("y", None), value("r", None), value("q", None), value("q2", None),
                        value("r2", None), value("r3", None)],
                       [tensor("one", np.ones(3, np.float32)), ints("s", [0, -1]), ints("s2", [-1, 1])])
    feed = {"x": np.ones((2, 1), np.float32), "u": np.ones((2, 3), np.float32),
            "shape_in": np.array([1, 2], np.int64), "train": np.array(False)}
    model = shaped(model, feed)
    result = remove(model)
    assert result.stats == {"nodes_removed": 0, "skipped_not_constant": 1, "skipped_dropout_training": 1,
                            "skipped_broadcast": 1, "skipped_unknown_shape": 2, "skipped_graph_output": 1}
    assert_identical(model, result.model, feed)


def test_identity_feeding_a_graph_output_renames_its_producer():
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node("Identity", ["t"], ["a"]),  # removed: a -> t
        helper.make_node("Neg", ["t"], ["n"]),
        helper.make_node("Identity", ["a"], ["y"]),  # graph output: Relu now writes y
        helper.make_node("Abs", ["a"], ["b"]),
        helper.make_node("Identity", ["t"], ["y2"]),  # t is y now, a graph output: kept
        helper.make_node("Identity", ["x"], ["y3"]),  # copies a graph input: kept
        helper.make_node("Identity", ["w"], ["y4"]),  # copies an initializer: kept
    ]
    outputs = [value(n, [2, 3, 4]) for n in ("n", "y", "b", "y2", "y3", "y4")]
    model = make_model(nodes, [value("x", [2, 3, 4])], outputs, [tensor("w", X + 1)],
                       value_info=[value("t", [2, 3, 4]), value("a", [2, 3, 4])])
    result = remove(model)
    assert result.stats == {"nodes_removed": 2, "removed_Identity": 2, "producers_renamed": 1,
                            "skipped_graph_output": 3}
    g = result.model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("Relu", ["x"], ["y"]), ("Neg", ["y"], ["n"]), ("Abs", ["y"], ["b"]), ("Identity", ["y"], ["y2"]),
        ("Identity", ["x"], ["y3"]), ("Identity", ["w"], ["y4"])]
    assert [o.name for o in g.output] == ["n", "y", "b", "y2", "y3", "y4"]
    assert list(g.value_info) == []
    assert_identical(model, result.model, {"x": X})


def test_a_renamed_producer_is_renamed_inside_subgraphs_too():
    branch = helper.make_graph([helper.make_node("Neg", ["t"], ["n"])], "b", [], [value("n", [2, 3, 4])])
    nodes = [helper.make_node("Relu", ["x"], ["t"]),
             helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch),
             helper.make_node("Identity", ["t"], ["y"])]
    model = make_model(nodes, [value("x", [2, 3, 4]), value("c", [], TensorProto.BOOL)],
                       [value("z", [2, 3, 4]), value("y", [2, 3, 4])])
    result = remove(model)
    assert result.stats == {"nodes_removed": 1, "removed_Identity": 1, "producers_renamed": 1}
    g = result.model.graph
    assert list(g.node[0].output) == ["y"]
    assert [list(a.g.node[0].input) for a in g.node[1].attribute] == [["y"], ["y"]]
    for c in (True, False):
        assert_identical(model, result.model, {"x": X, "c": np.array(c)})


def test_models_with_shadowed_names_are_left_alone():
    branch = helper.make_graph([helper.make_node("Neg", ["x"], ["a"])], "b", [], [value("a", [2, 4])])
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
             helper.make_node("Neg", ["a"], ["z"])]
    model = make_model(nodes, [value("x", [2, 4]), value("c", [], TensorProto.BOOL)],
                       [value("y", [2, 4]), value("z", [2, 4])])
    result = RemoveNoops()(copy(model))
    assert not result.modified
    assert result.stats == {"nodes_removed": 0, "skipped_shadowed_names": 1}


def test_mul_by_one_through_an_identity_of_the_constant():
    nodes = [helper.make_node("Identity", ["one"], ["k"]), helper.make_node("Mul", ["x", "k"], ["t"]),
             helper.make_node("Neg", ["t"], ["y"])]
    model = make_model(nodes, [value("x", [2, 3, 4])], [value("y", [2, 3, 4])], [tensor("one", np.float32(1))])
    result = remove(model)
    assert result.stats == {"nodes_removed": 2, "removed_Identity": 1, "removed_Mul": 1}
    assert_identical(model, result.model, {"x": X})


def _if_model():
    """Outer a = Identity(x), read inside both branches; the then branch ends in an Identity of its own."""
    then_branch = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["tn"]), helper.make_node("Identity", ["tn"], ["t"])],
        "then", [], [value("t", [2, 3, 4])])
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["a", "one"], ["e1"]), helper.make_node("Abs", ["e1"], ["e"])],
        "else", [], [value("e", [2, 3, 4])])
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("ReduceSum", ["a"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    return make_model(nodes, [value("x", [2, 3, 4])], [value("y", [2, 3, 4])],
                      [tensor("zero", np.float32(0)), tensor("one", np.float32(1))])


def test_uses_inside_subgraphs_are_renamed():
    model = _if_model()
    result = remove(model)
    assert result.stats == {"nodes_removed": 3, "removed_Identity": 2, "removed_Mul": 1, "producers_renamed": 1}
    g = result.model.graph
    branches = {a.name: a.g for a in g.node[-1].attribute}
    assert [(n.op_type, list(n.input), list(n.output)) for n in branches["then_branch"].node] == [
        ("Neg", ["x"], ["t"])]
    assert [(n.op_type, list(n.input)) for n in branches["else_branch"].node] == [("Abs", ["x"])]
    for x in (X, -X):
        assert_identical(model, result.model, {"x": x})


def test_old_opset_forms():
    """Pad-2 (pads attribute) and Slice-1 (attributes), Dropout-10 (no training input)."""
    nodes = [
        helper.make_node("Pad", ["x"], ["p"], pads=[0] * 6),
        helper.make_node("Slice", ["p"], ["s"], starts=[0], ends=[INT64_MAX], axes=[0]),
        helper.make_node("Dropout", ["s"], ["d"]),
        helper.make_node("Neg", ["d"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [2, 3, 4])], [value("y", [2, 3, 4])], opset=9)
    model.ir_version = 4
    result = remove(model)
    assert result.stats == {"nodes_removed": 3, "removed_Pad": 1, "removed_Slice": 1, "removed_Dropout": 1}
    assert_identical(model, result.model, {"x": X})


# --------------------------------------------------------------------------- property

NOOP_KINDS = ["Identity", "Mul1", "AddNeg0", "Reshape", "Transpose", "Cast"]


@st.composite
def graphs_with_noops(draw):
    """Random DAGs over x[2, 3] mixing real ops and no-ops; some no-op outputs are graph outputs."""
    inits = [tensor("one", np.float32(1)), tensor("nz", np.float32(-0.0)), ints("shape", [2, 3])]
    values, nodes = ["x"], []
    for i in range(draw(st.integers(1, 16))):
        src = draw(st.sampled_from(values))
        out = f"v{i}"
        kind = draw(st.sampled_from(["Relu", "Neg", "Sin", "Add", *NOOP_KINDS]))
        if kind == "Add":
            nodes.append(helper.make_node("Add", [src, draw(st.sampled_from(values))], [out]))
        elif kind == "Mul1":
            nodes.append(helper.make_node("Mul", [src, "one"], [out]))
        elif kind == "AddNeg0":
            nodes.append(helper.make_node("Add", ["nz", src], [out]))
        elif kind == "Reshape":
            nodes.append(helper.make_node("Reshape", [src, "shape"], [out]))
        elif kind == "Transpose":
            nodes.append(helper.make_node("Transpose", [src], [out], perm=[0, 1]))
        elif kind == "Cast":
            nodes.append(helper.make_node("Cast", [src], [out], to=TensorProto.FLOAT))
        else:
            nodes.append(helper.make_node(kind, [src], [out]))
        values.append(out)
    outputs = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=4, unique=True))
    return make_model(nodes, [value("x", [2, 3])], [value(o, [2, 3]) for o in outputs], inits)


@settings(max_examples=60, deadline=None)
@given(graphs_with_noops())
def test_remove_noops_never_changes_outputs(model):
    result = remove(model)
    x = np.array([[-0.0, 0.0, 1.5], [np.inf, -2.0, np.nan]], np.float32)
    assert_identical(model, result.model, {"x": x})
    outputs = {o.name for o in result.model.graph.output}
    for node in result.model.graph.node:  # what is left of the no-ops copies a graph output into another
        if node.op_type in ("Identity", "Reshape", "Transpose", "Cast") or (
                node.op_type in ("Mul", "Add") and ({"one", "nz"} & set(node.input))):
            assert node.output[0] in outputs


# --------------------------------------------------------------------------- real models


def test_remove_noops_on_ppocr_cls():
    path = SHARED_MODELS / "ppocr_cls" / "model.onnx"
    if not path.exists():
        pytest.skip("shared ppocr_cls model is absent")
    model = load_model(path)
    result = remove(model)
    # The trailing Identity onto the output goes (Softmax writes the output itself); the final
    # Reshape's shape is computed at run time.
    assert result.stats == {"nodes_removed": 1, "removed_Identity": 1, "producers_renamed": 1,
                            "skipped_not_constant": 1}
    assert len(result.model.graph.node) == len(model.graph.node) - 1
    feed = {k: v[0] for k, v in feeds_for(model, count=1).items()}
    assert_identical(model, result.model, feed)


def test_remove_noops_on_transformer_sample():
    path = SAMPLES / "transformer.onnx"
    if not path.exists():
        pytest.skip("samples/transformer.onnx is absent")
    model = load_model(path)
    result = remove(model)
    assert result.stats == {"nodes_removed": 0}
    assert result.model.SerializeToString() == model.SerializeToString()
