"""fold-constants: each case runs in onnxruntime before and after, passes the full checker, and folds only once."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.graph import STANDARD_DOMAINS, constant_tensor, walk_graphs
from onnxopt.modelio import load_model, needs_file, save_scratch
from onnxopt.passes import fold_constants
from onnxopt.passes.fold_constants import FoldConstants
from onnxopt.tensors import tensor_to_array
from onnxopt.validate import check_interface, check_structure

from conftest import assert_same_outputs, feeds_for, make_model, run, tensor, value


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def fold(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None, rtol=1e-5, **options):
    """Fold a copy; check validity, interface, outputs (when feeds are given) and idempotence."""
    result = FoldConstants(FoldConstants.Options(**options))(copy(model))
    assert checker_complaint(result.model) is None
    assert check_interface(model, result.model) == []
    assert all(isinstance(v, (int, float)) for v in result.stats.values())
    if feeds is not None:
        assert_same_outputs(model, result.model, feeds, rtol=rtol)
    again = FoldConstants(FoldConstants.Options(**options))(copy(result.model))
    assert not again.modified and again.stats["nodes_folded"] == 0
    return result


def checker_complaint(model: onnx.ModelProto) -> str | None:
    """The full checker; a model with external data is checked from a file, as the pass manager does."""
    if not needs_file(model):
        return check_structure(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_scratch(model, path, placeholders=True)
        return check_structure(model, path)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def ints(name, values) -> onnx.TensorProto:
    return tensor(name, np.array(values, dtype=np.int64))


def constant(name, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=tensor("", np.asarray(array)))


def shape_chain(batch) -> onnx.ModelProto:
    """y = x.reshape(x.shape[0], x.shape[1] * x.shape[2]) as PyTorch exports it, plus Shape(start=1)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Slice", ["s", "two", "three"], ["d2"]),  # Slice picks [x.shape[2]]
        helper.make_node("Squeeze", ["d2", "zero"], ["d2s"]),
        helper.make_node("Mul", ["d1", "d2s"], ["flat"]),
        helper.make_node("Unsqueeze", ["d0", "zero"], ["d0u"]),
        helper.make_node("Unsqueeze", ["flat", "zero"], ["flatu"]),
        helper.make_node("Concat", ["d0u", "flatu"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Shape", ["x"], ["tail"], start=-2),
        helper.make_node("Cast", ["tail"], ["z"], to=TensorProto.FLOAT),
    ]
    inits = [ints("i0", 0), ints("i1", 1), ints("two", [2]), ints("three", [3]), ints("zero", [0])]
    return make_model(nodes, [value("x", [batch, 3, 4])], [value("y", [batch, 12]), value("z", [2])], inits)


def test_static_shape_chain_collapses_to_one_reshape():
    model = shape_chain(2)
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Constant", "Reshape"]  # z = Shape(x)[-2:] is a graph output: a Constant node
    assert result.stats["nodes_folded"] == 11 and result.stats["shape_nodes_folded"] == 2
    shape = initializers(result.model)["shape"]
    assert shape.data_type == TensorProto.INT64 and onnx.numpy_helper.to_array(shape).tolist() == [2, 12]
    assert set(initializers(result.model)) == {"shape"}  # the indices only folded nodes read are gone
    assert result.stats["initializers_removed"] == 5 and result.stats["constant_nodes_added"] == 1


def test_symbolic_batch_folds_only_what_does_not_read_it():
    model = shape_chain("batch")
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)}
    result = fold(model, feeds)
    assert ops(result.model) == ["Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]
    assert onnx.numpy_helper.to_array(initializers(result.model)["flatu"]).tolist() == [12]
    assert result.stats["shape_nodes_folded"] == 3  # Gather(s, 1), Slice(s, 2:3), Shape(start=-2)
    for batch in (1, 7):  # the batch dim stays dynamic
        x = np.ones((batch, 3, 4), np.float32)
        assert run(result.model, {"x": x})[0].shape == (batch, 12)


def test_shape_made_static_by_a_fold_folds_in_the_same_run():
    """Shape inference cannot follow Max, so Pad's output shape is unknown until its pads are folded."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Max", ["s", "two"], ["high"]),
             helper.make_node("Concat", ["zeros", "high"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["p"]), helper.make_node("Shape", ["p"], ["ps"]),
             helper.make_node("Reshape", ["p", "ps"], ["y"])]
    model = make_model(nodes, [value("x", [4, 6])], [value("y", [8, 12])], [ints("two", [2, 2]), ints("zeros", [0, 0])])
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Pad", "Reshape"] and result.stats["shape_nodes_folded"] == 2


@pytest.mark.parametrize("batch", [5, "batch"])
def test_size_folds_when_every_dim_is_static(batch):
    nodes = [helper.make_node("Size", ["x"], ["n"]), helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["x", "nf"], ["y"])]
    model = make_model(nodes, [value("x", [batch, 3])], [value("y", [batch, 3])])
    result = fold(model, feeds_for(model))
    assert ops(result.model) == (["Div"] if batch == 5 else ops(model))


def test_constant_arithmetic_folds_with_dtypes_kept():
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3)).astype(np.float16) for _ in range(2))
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Transpose", ["ab"], ["t"]),
        helper.make_node("Add", ["x", "t"], ["y"]),
        constant("c", np.array([3, -4], np.int32)),
        helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT64),
        helper.make_node("Mul", ["ci", "k"], ["m"]),
        helper.make_node("Add", ["i", "m"], ["z"]),
    ]
    model = make_model(nodes, [value("x", [3, 2], TensorProto.FLOAT16), value("i", [2], TensorProto.INT64)],
                       [value("y", [3, 2], TensorProto.FLOAT16), value("z", [2], TensorProto.INT64)],
                       [tensor("a", a), tensor("b", b), ints("k", [5, 6])])
    result = fold(model, feeds_for(model), rtol=2e-3)  # float16: onnxruntime's Add may round x + (a + b) once
    assert ops(result.model) == ["Add", "Add"]
    folded = initializers(result.model)
    assert set(folded) == {"t", "m"}
    assert folded["t"].data_type == TensorProto.FLOAT16 and folded["m"].data_type == TensorProto.INT64
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded["t"]), (a + b).T)
    assert onnx.numpy_helper.to_array(folded["m"]).tolist() == [15, -24]
    assert result.stats["nodes_folded"] == 4 and result.stats["nodes_removed"] == 1  # the Constant c


def test_initializers_that_are_graph_inputs_are_not_constants():
    nodes = [helper.make_node("Neg", ["w"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])]
    model = make_model(nodes, [value("x", [2]), value("w", [2])], [value("y", [2])],
                       [tensor("w", np.ones(2, np.float32))])
    result = fold(model)
    assert not result.modified and ops(result.model) == ["Neg", "Add"]
    session = onnxruntime.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros(2, np.float32), "w": np.full(2, 3, np.float32)})[0].tolist() == [-3, -3]


def test_shape_of_an_overridable_initializer_follows_its_declaration():
    nodes = [helper.make_node("Shape", ["w"], ["s"]), helper.make_node("Shape", ["x"], ["t"]),
             helper.make_node("Concat", ["s", "t"], ["y"], axis=0)]
    model = make_model(nodes, [value("x", [2]), value("w", ["n"])], [value("y", [2], TensorProto.INT64)],
                       [tensor("w", np.ones(2, np.float32))])
    result = fold(model)
    assert ops(result.model) == ["Shape", "Concat"] and result.stats["shape_nodes_folded"] == 1
    session = onnxruntime.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros(2, np.float32), "w": np.ones(5, np.float32)})[0].tolist() == [5, 2]


def test_random_nodes_and_what_they_feed_are_not_folded():
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], shape=[2], seed=1.0),
        helper.make_node("RandomNormalLike", ["c"], ["rn"]),
        helper.make_node("Add", ["r", "rn"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [2])], [value("y", [2])], [tensor("c", np.zeros(2, np.float32))])
    result = fold(model)
    assert not result.modified and ops(result.model) == ops(model)
    assert result.stats["skipped_nondeterministic"] == 2


def test_training_dropout_of_a_constant_is_not_folded():
    """Dropout with training_mode draws a new mask every run: folding would freeze one."""
    nodes = [helper.make_node("Dropout", ["c", "ratio", "training"], ["d"]), helper.make_node("Mul", ["x", "d"], ["y"])]
    model = make_model(nodes, [value("x", [64])], [value("y", [64])],
                       [tensor("c", np.ones(64, np.float32)), tensor("ratio", np.float32(0.5)),
                        tensor("training", np.array(True))])
    result = fold(model)
    assert not result.modified and result.stats["skipped_nondeterministic"] == 1


def test_ops_the_reference_gets_wrong_are_not_folded():
    """Softmax before opset 13 flattens to 2-D at ``axis``; the reference knows only the newer form (and
    its LRN is wrong everywhere): folding them would change what onnxruntime computes."""
    c = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Softmax", ["c"], ["s"], axis=0), helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3])], [tensor("c", c)], opset=11)
    result = fold(model, feeds_for(model))
    assert not result.modified and result.stats["skipped_unsupported_Softmax"] == 1
    model.opset_import[0].version = 13  # axis 0 alone, as the reference computes it
    assert ops(fold(model, feeds_for(model)).model) == ["Add"]
    nodes = [helper.make_node("LRN", ["c"], ["s"], size=3), helper.make_node("Add", ["x", "s"], ["y"])]
    model = make_model(nodes, [value("x", [1, 4, 1, 1])], [value("y", [1, 4, 1, 1])],
                       [tensor("c", np.ones((1, 4, 1, 1), np.float32))])
    assert fold(model, feeds_for(model)).stats["skipped_unsupported_LRN"] == 1


def test_old_op_forms_fold_by_their_own_version():
    """Unsqueeze with an ``axes`` attribute (opset 11) and Clip with min/max attributes (opset 10) are
    forms the newest reference versions reject; they fold by the version of the model's opset."""
    c = np.arange(3, dtype=np.float32)
    nodes = [helper.make_node("Unsqueeze", ["c"], ["u"], axes=[0]), helper.make_node("Add", ["x", "u"], ["y"])]
    model = make_model(nodes, [value("x", [1, 3])], [value("y", [1, 3])], [tensor("c", c)], opset=11)
    assert ops(fold(model, feeds_for(model)).model) == ["Add"]
    nodes = [helper.make_node("Clip", ["c"], ["k"], min=0.5, max=1.5), helper.make_node("Add", ["x", "k"], ["y"])]
    model = make_model(nodes, [value("x", [3])], [value("y", [3])], [tensor("c", c)], opset=10)
    folded = fold(model, feeds_for(model)).model
    assert ops(folded) == ["Add"]
    np.testing.assert_array_equal(tensor_to_array(initializers(folded)["k"]), np.clip(c, 0.5, 1.5))


def test_dequantize_linear_of_weights_stays_and_custom_ops_are_left_alone():
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Mystery", ["scale"], ["unused"], domain="custom"),
    ]
    model = make_model(nodes, [value("x", [1, 2])], [value("y", [1, 2])],
                       [tensor("wq", np.array([[1, -2], [3, 4]], np.int8)), tensor("scale", np.float32(0.5)),
                        tensor("zp", np.int8(0))])
    model.opset_import.append(helper.make_opsetid("custom", 1))
    result = FoldConstants()(copy(model))
    assert not result.modified
    assert result.stats["skipped_DequantizeLinear"] == 1 and result.stats["skipped_custom_domain"] == 1


def constant_of_shape(shape: list[int], **options):
    """ConstantOfShape(shape) summed into the output, so that its size matters but the output stays small."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], value=tensor("", np.array([0.5], np.float32))),
        helper.make_node("ReduceSum", ["filled"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ]
    return make_model(nodes, [value("x", [1])], [value("y", [1])], [ints("shape", shape)])


def test_size_guard_keeps_nodes_that_would_grow_the_model():
    small = constant_of_shape([4, 4])
    assert ops(fold(small, feeds_for(small)).model) == ["Add"]
    big = constant_of_shape([512, 1024])  # 2 MiB of float32 from a 16-byte shape
    result = fold(big, feeds_for(big))
    assert ops(result.model) == ["ConstantOfShape", "ReduceSum", "Add"] and result.stats["skipped_too_large"] == 1
    assert ops(fold(big, feeds_for(big), max_bytes=4 << 20).model) == ["Add"]


def test_size_guard_decides_before_evaluating():
    """40 GB would not fit in memory: the inferred shape stops it before the reference evaluator runs."""
    result = fold(constant_of_shape([100_000, 100_000]))
    assert result.stats["skipped_too_large"] == 1 and not result.modified


def test_big_external_constants_are_not_read_for_an_output_of_unknown_size(tmp_path, monkeypatch):
    nodes = [helper.make_node("NonZero", ["w"], ["nz"]), helper.make_node("Shape", ["nz"], ["y"])]
    model = make_model(nodes, [], [value("y", [2], TensorProto.INT64)],
                       [tensor("w", np.ones((64, 64), np.float32))])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    loaded = load_model(tmp_path / "m.onnx")

    def unread(t):
        raise AssertionError(f"{t.name} was read")

    monkeypatch.setattr(fold_constants, "tensor_to_array", unread)
    result = FoldConstants(FoldConstants.Options(max_bytes=1024))(loaded)
    assert not result.modified and result.stats["skipped_unknown_size"] == 1


def test_folded_tensors_of_external_data_models_stay_out_of_memory(tmp_path):
    w = np.arange(32 * 64, dtype=np.float32).reshape(32, 64)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [value("x", [1, 64])], [value("y", [1, 32])], [tensor("w", w)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    result = fold(load_model(tmp_path / "m.onnx"), feeds_for(model))
    (wt,) = result.model.graph.initializer
    assert wt.name == "wt" and wt.data_location == TensorProto.EXTERNAL and not wt.raw_data
    np.testing.assert_array_equal(tensor_to_array(wt), w.T)


def if_model() -> onnx.ModelProto:
    """Branches that compute from an outer constant ``k``; a second If whose inputs are all constant."""
    then_branch = helper.make_graph(
        [constant("one", np.float32(1)), helper.make_node("Add", ["k", "one"], ["k1"]),
         helper.make_node("Mul", ["x", "k1"], ["t"])], "then", [], [value("t", [2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["k"], ["e"])], "else", [], [value("e", [2])])
    constant_branch = helper.make_graph([helper.make_node("Identity", ["k2"], ["c"])], "c", [], [value("c", [2])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("If", ["true"], ["c_out"], then_branch=constant_branch, else_branch=constant_branch),
        helper.make_node("Add", ["b", "c_out"], ["y"]),
    ]
    inits = [tensor("zero", np.float32(0)), tensor("k", np.array([2, 3], np.float32)),
             tensor("k2", np.array([1, 1], np.float32)), tensor("true", np.array(True))]
    return make_model(nodes, [value("x", [2])], [value("y", [2])], inits)


def test_if_branches_fold_with_outer_constants_and_a_constant_condition_inlines():
    model = if_model()
    feeds = {"x": np.array([[1, 2], [-1, -2]], np.float32)}  # one sample per branch
    result = fold(model, feeds)
    assert ops(result.model) == ["ReduceSum", "Greater", "If", "Constant", "Add"]  # If(true) became its branch
    branches = {a.name: a.g for a in result.model.graph.node[2].attribute}
    then_branch, else_branch = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in then_branch.node] == ["Mul"]
    assert [t.name for t in then_branch.initializer] == ["k1"]
    assert [n.op_type for n in else_branch.node] == ["Constant"]  # a branch output: stays a node
    inlined = result.model.graph.node[3]
    assert list(inlined.output) == ["c_out"] and tensor_to_array(constant_tensor(inlined)).tolist() == [1, 1]
    assert {"k", "k2"}.isdisjoint(initializers(result.model))  # nothing reads them any more
    assert result.stats["ifs_inlined"] == 1
    assert result.stats["nodes_folded"] == 4 and result.stats["constant_nodes_added"] == 3
    assert result.stats["initializers_removed"] == 2 and result.stats["nodes_removed"] == 1  # k, k2; Constant one


def test_if_on_a_constant_condition_becomes_its_branch():
    """The taken branch's nodes replace the If: its outputs take the If's names, its other values fresh
    ones, its initializers move out, and a nested body still reads them."""
    inner = helper.make_graph([helper.make_node("Mul", ["h", "w"], ["n"])], "inner", [], [value("n", [2])])
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["h"]),
         helper.make_node("If", ["flag"], ["nested"], then_branch=inner, else_branch=inner)],
        "then", [], [value("nested", [2]), value("h", [2])], initializer=[tensor("w", np.array([2, 3], np.float32))])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"]), helper.make_node("Abs", ["x"], ["f"])],
                                    "else", [], [value("e", [2]), value("f", [2])])
    nodes = [helper.make_node("Equal", ["mode", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["a", "b"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, [value("x", [2]), value("flag", [1], TensorProto.BOOL)], [value("y", [2])],
                       [tensor("mode", np.int64(1)), tensor("one", np.int64(1))])
    feeds = {"x": np.array([[1, -2], [0.5, 3]], np.float32), "flag": np.array([[True], [False]])}
    result = fold(model, feeds)
    assert result.stats["ifs_inlined"] == 1
    assert ops(result.model) == ["Add", "If", "Sub"]
    add, nested_if, _ = result.model.graph.node
    assert list(add.output) == ["b"] and list(nested_if.output) == ["a"]  # the If's own output names
    nested = next(a.g for a in nested_if.attribute if a.name == "then_branch")
    assert set(nested.node[0].input) == {"b", *add.input[1:]}  # reads the inlined values by their new names
    assert add.input[1] in initializers(result.model)


def test_a_branch_output_that_is_a_branch_initializer_is_bridged_then_folded():
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["h"])], "then", [],
                                    [value("h", [2]), value("w", [2])], initializer=[tensor("w", np.array([2, 3], np.float32))])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"]), helper.make_node("Abs", ["x"], ["f"])],
                                    "else", [], [value("e", [2]), value("f", [2])])
    nodes = [helper.make_node("If", ["yes"], ["a", "b"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Sub", ["a", "b"], ["y"])]
    model = make_model(nodes, [value("x", [2])], [value("y", [2])], [tensor("yes", np.array(True))])
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Add", "Sub"]  # Identity(w) -> b, folded in the next round
    assert tensor_to_array(initializers(result.model)["b"]).tolist() == [2, 3]


def test_inlining_that_strict_shape_inference_rejects_is_put_back():
    """A branch may compute a [1] where the If's consumers want a scalar (Range): the checker would
    reject the inlined model, so the If stays."""
    branch = helper.make_graph([helper.make_node("Identity", ["n1"], ["limit"])], "b", [], [value("limit", None)],
                               initializer=[tensor("n1", np.array([4.0], np.float32))])
    nodes = [helper.make_node("If", ["yes"], ["n"], then_branch=branch, else_branch=branch),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    model = make_model(nodes, [value("x", [4])], [value("y", [4])],
                       [tensor("yes", np.array(True)), tensor("zero", np.float32(0)), tensor("one", np.float32(1))])
    result = fold(model, {"x": np.ones((1, 4), np.float32)})
    assert result.stats["skipped_if_inline_invalid"] == 1 and "If" in ops(result.model)


def test_models_before_ir_4_get_constant_nodes():
    nodes = [
        constant("c", np.array([1, 2], np.float32)),
        constant("d", np.array([3, 4], np.float32)),
        helper.make_node("Add", ["c", "d"], ["cd"]),
        helper.make_node("Mul", ["x", "cd"], ["m"]),
        helper.make_node("Add", ["m", "w"], ["y"]),
        helper.make_node("Neg", ["w"], ["z"]),  # w is an input with a default: never folded
    ]
    model = make_model(nodes, [value("x", [2]), value("w", [2])], [value("y", [2]), value("z", [2])],
                       [tensor("w", np.array([5, 6], np.float32))], opset=8)
    model.ir_version = 3
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Constant", "Mul", "Add", "Neg"]
    assert [t.name for t in result.model.graph.initializer] == ["w"]
    assert constant_tensor(result.model.graph.node[0]) is not None and result.model.graph.node[0].output[0] == "cd"


def test_values_a_constant_node_cannot_hold_before_opset_9_are_not_folded():
    """Constant-1 holds float16/float/double only: a bool graph output, and int64 shapes at IR 3, stay computed."""
    nodes = [helper.make_node("Not", ["t"], ["z"]), helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["y"])]
    model = make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3]), value("z", [2], TensorProto.BOOL)],
                       [tensor("t", np.array([True, False]))], opset=7)
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Not", "Reshape"] and result.stats["skipped_constant_type"] == 1
    nodes = [constant("c", np.array([1, 2], np.float32)), helper.make_node("Neg", ["c"], ["n"]), *nodes[1:]]
    model = make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3]), value("n", [2])], opset=7)
    model.ir_version = 3  # every folded value becomes a Constant node
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Constant", "Shape", "Reshape"] and result.stats["skipped_constant_type"] == 1


def test_folded_graph_output_becomes_a_constant_node():
    nodes = [helper.make_node("Add", ["a", "a"], ["y"]), helper.make_node("Relu", ["x"], ["z"])]
    model = make_model(nodes, [value("x", [2])], [value("y", [2]), value("z", [2])],
                       [tensor("a", np.array([1, -1], np.float32))])
    result = fold(model, feeds_for(model))
    assert ops(result.model) == ["Constant", "Relu"] and result.stats["constant_nodes_added"] == 1
    assert [t.name for t in result.model.graph.initializer] == []


def test_ppocr_cls_folds_its_reshape_constants(shared_models):
    path = shared_models / "ppocr_cls" / "model.onnx"
    if not path.is_file():
        pytest.skip("ppocr_cls is absent")
    model = load_model(path)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 1, 3, 48, 192)).astype(np.float32)}
    result = fold(model, feeds)
    assert result.stats["nodes_folded"] == 19  # 18 Reshape of SE offsets and a Cast; the batch-dim Shape stays
    assert len(result.model.graph.node) == len(model.graph.node) - 19 - result.stats["nodes_removed"]
    for x in feeds["x"]:
        for a, b in zip(run(model, {"x": x}), run(result.model, {"x": x})):
            np.testing.assert_array_equal(a, b)


BINARY = ("Add", "Sub", "Mul", "Max")
UNARY = ("Neg", "Abs", "Relu", "Sigmoid")


@st.composite
def mixed_graphs(draw):
    """Random DAGs over constants (initializers, Constant nodes) and an input: each node reads earlier values."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits, values = [], [], ["x"]
    for i in range(draw(st.integers(1, 4))):
        array = rng.standard_normal(draw(st.sampled_from([(3,), (2, 3), (1, 3)]))).astype(np.float32)
        if draw(st.booleans()):
            inits.append(tensor(f"c{i}", array))
        else:
            nodes.append(constant(f"c{i}", array))
        values.append(f"c{i}")
    for i in range(draw(st.integers(1, 12))):
        op = draw(st.sampled_from(BINARY + UNARY))
        inputs = [draw(st.sampled_from(values)) for _ in range(2 if op in BINARY else 1)]
        nodes.append(helper.make_node(op, inputs, [f"v{i}"]))
        values.append(f"v{i}")
    outputs = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3, unique=True))
    nodes += [helper.make_node("Add", ["x", o], [f"out{j}"]) for j, o in enumerate(outputs)]
    return make_model(nodes, [value("x", [2, 3])], [value(f"out{j}", [2, 3]) for j in range(len(outputs))], inits)


@settings(max_examples=40, deadline=None)
@given(mixed_graphs())
def test_random_constant_dags_fold_to_what_onnxruntime_computes(model):
    result = fold(model, {"x": np.linspace(-2, 2, 12, dtype=np.float32).reshape(2, 2, 3)})
    for graph in walk_graphs(result.model.graph):
        constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        for node in graph.node:  # complete: every node left reads the input (or is a constant)
            assert node.op_type == "Constant" or not set(node.input) <= constants
        assert all(n.domain in STANDARD_DOMAINS for n in graph.node)
