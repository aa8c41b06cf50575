import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxopt.data import load_feeds
from onnxopt.passes.fuse_bias import FuseBias
from onnxopt.validate import Tolerances, check_structure, compare_outputs, run_model

from conftest import make_model, tensor, value

RNG = np.random.default_rng(1)


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def assert_within_gate(a, b, feeds):
    """The exact-pass gate: every element within atol + rtol * (|ref| + rms(ref)), rtol 1e-5."""
    samples = [dict(zip(feeds, v)) for v in zip(*feeds.values())]
    comparison = compare_outputs(run_model(a, samples), run_model(b, samples), Tolerances(), exact=True)
    assert comparison.failures == []


def fused(model, **expect):
    """Run the pass on a copy; check validity, stats and idempotence; return the result."""
    result = FuseBias()(copy(model))
    assert check_structure(result.model) is None
    for key, n in expect.items():
        assert result.stats.get(key, 0) == n, (key, result.stats)
    assert all(isinstance(v, int) for v in result.stats.values())
    assert result.modified == (result.stats["biases_fused"] > 0)
    assert not FuseBias()(copy(result.model)).modified
    if not result.modified:
        assert result.model.SerializeToString() == model.SerializeToString()
    return result


def ops(model):
    return [n.op_type for n in model.graph.node]


def const(name, array):
    return helper.make_node("Constant", [], [name], value=tensor(name, np.asarray(array)))


def images(shape=(3, 1, 4, 6, 6)):
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


def conv_add(add_shape, with_bias=False, rank=4, constant_first=False, extra_nodes=(), as_constant=False, size=6,
             channels=8, y_shape=None):
    """x -> Conv(8 channels) -> Add(constant of add_shape) -> y."""
    kernel = (3,) * (rank - 2)
    inits = [tensor("w", RNG.standard_normal((channels, 4, *kernel)).astype(np.float32))]
    inputs = ["x", "w"]
    if with_bias:
        inits.append(tensor("b", RNG.standard_normal(8).astype(np.float32)))
        inputs.append("b")
    k = RNG.standard_normal(add_shape).astype(np.float32)
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=[1] * (2 * (rank - 2)), name="conv")]
    if as_constant:
        nodes.insert(0, const("k", k))
    else:
        inits.append(tensor("k", k))
    nodes += [helper.make_node("Add", ["k", "c"] if constant_first else ["c", "k"], ["y"], name="add"), *extra_nodes]
    spatial = ["n", *[size] * (rank - 2)]
    return make_model(nodes, [value("x", [spatial[0], 4, *spatial[1:]])],
                      [value("y", y_shape or [spatial[0], channels, *spatial[1:]])],
                      inits, value_info=[value("c", [spatial[0], channels, *spatial[1:]])])


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1), (1, 1, 1), (1,), ()])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("constant_first", [False, True])
def test_conv_per_channel_constant_becomes_the_bias(shape, with_bias, constant_first):
    model = conv_add(shape, with_bias, constant_first=constant_first)
    result = fused(model, biases_fused=1, nodes_removed=1)
    assert ops(result.model) == ["Conv"]
    conv = result.model.graph.node[0]
    assert conv.output == ["y"] and len(conv.input) == 3
    bias = next(t for t in result.model.graph.initializer if t.name == conv.input[2])
    assert list(bias.dims) == [8]
    assert {t.name for t in result.model.graph.initializer} == {"w", conv.input[2]}  # the Add's constant went
    assert not result.model.graph.value_info  # the Conv's old output is gone
    assert_within_gate(model, result.model, images())


def test_conv1d_bias_of_shape_c_by_1():
    model = conv_add((8, 1), rank=3)
    assert ops(fused(model, biases_fused=1).model) == ["Conv"]
    assert_within_gate(model, FuseBias()(copy(model)).model, images((2, 1, 4, 6)))


def test_conv_transpose_bias():
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2]),
             helper.make_node("Add", ["c", "k"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4, 5, 5])], [value("y", ["n", 6, 11, 11])],
                       [tensor("w", w), tensor("k", RNG.standard_normal((6, 1, 1)).astype(np.float32))])
    result = fused(model, biases_fused=1)
    assert ops(result.model) == ["ConvTranspose"]
    assert_within_gate(model, result.model, images((2, 1, 4, 5, 5)))


def test_a_bias_behind_a_chain_longer_than_the_recursion_limit():
    """Constants are resolved and dead chains released with worklists: depth is no limit."""
    import sys

    depth = sys.getrecursionlimit() + 100
    chain = [helper.make_node("Identity", [f"b{i}"], [f"b{i + 1}"]) for i in range(depth)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), *chain,
             helper.make_node("Add", ["c", f"b{depth}"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6])], [value("y", ["n", 8, 6, 6])],
                       [tensor("w", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)),
                        tensor("b0", RNG.standard_normal((8, 1, 1)).astype(np.float32))])
    result = FuseBias()(copy(model))
    assert result.stats["biases_fused"] == 1 and ops(result.model) == ["Conv"]
    assert_within_gate(model, result.model, images())


def test_constant_node_and_reshape_of_constant_like_paddle():
    """Paddle: Add(Conv, Reshape(Constant bias, Constant shape)); everything only the Add read goes."""
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    nodes = [const("w", w), const("bias", RNG.standard_normal(8).astype(np.float32)),
             const("shape", np.array([1, 8, 1, 1], np.int64)),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["bias", "shape"], ["bias4"]),
             helper.make_node("Add", ["c", "bias4"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6])], [value("y", ["n", 8, 6, 6])])
    result = fused(model, biases_fused=1, nodes_removed=4)
    assert ops(result.model) == ["Constant", "Conv"]
    assert_within_gate(model, result.model, images())
    # the same with initializers and Unsqueeze, and a Conv bias that was there already
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Unsqueeze", ["bias", "axes"], ["bias3"]),
             helper.make_node("Add", ["bias3", "c"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6])], [value("y", ["n", 8, 6, 6])],
                       [tensor("w", w), tensor("b", RNG.standard_normal(8).astype(np.float32)),
                        tensor("bias", RNG.standard_normal(8).astype(np.float32)),
                        tensor("axes", np.array([1, 2], np.int64))])
    result = fused(model, biases_fused=1, nodes_removed=2, initializers_removed=2)
    assert ops(result.model) == ["Conv"]
    assert_within_gate(model, result.model, images())


def test_constant_node_add_operand():
    model = conv_add((8, 1, 1), as_constant=True)
    result = fused(model, biases_fused=1, nodes_removed=2)
    assert ops(result.model) == ["Conv"]
    assert_within_gate(model, result.model, images())


def test_chain_of_adds_and_a_bias_shared_by_two_convs():
    """Conv -> Add -> Add folds both in one run; a constant added after two Convs serves both, then goes."""
    w = RNG.standard_normal((8, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"]), helper.make_node("Conv", ["x", "w2", "b"], ["c2"]),
             helper.make_node("Add", ["c1", "k"], ["a1"]), helper.make_node("Add", ["a1", "k2"], ["y1"]),
             helper.make_node("Add", ["c2", "k"], ["y2"])]
    inits = [tensor("w", w), tensor("w2", -w), tensor("b", RNG.standard_normal(8).astype(np.float32)),
             tensor("k", RNG.standard_normal((8, 1, 1)).astype(np.float32)), tensor("k2", np.float32(0.5))]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6])], [value("y1", ["n", 8, 6, 6]), value("y2", ["n", 8, 6, 6])],
                       inits)
    result = fused(model, biases_fused=3, nodes_removed=3)
    assert ops(result.model) == ["Conv", "Conv"]
    assert [n.output[0] for n in result.model.graph.node] == ["y1", "y2"]
    names = {t.name for t in result.model.graph.initializer}
    assert {"k", "k2"}.isdisjoint(names) and "b" in names  # b: a new bias for the first Conv, in place for the last
    assert result.model.graph.node[1].input[2] == "b"
    assert_within_gate(model, result.model, images())


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1)])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (), (3, 5)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 3.0), (2.0, 0.0)])
@pytest.mark.parametrize("add_shape", [(5,), (1, 5), ()])
def test_gemm_add_becomes_c(trans_a, trans_b, c_shape, alpha, beta, add_shape):
    a_shape = (4, 3) if trans_a else (3, 4)
    w = RNG.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [tensor("w", w), tensor("k", RNG.standard_normal(add_shape).astype(np.float32))]
    inputs = ["x", "w"]
    if c_shape is not None:
        inits.append(tensor("c0", RNG.standard_normal(c_shape).astype(np.float32)))
        inputs.append("c0")
    nodes = [helper.make_node("Gemm", inputs, ["g"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta),
             helper.make_node("Add", ["g", "k"], ["y"])]
    model = make_model(nodes, [value("x", list(a_shape))], [value("y", [3, 5])], inits)
    result = fused(model, biases_fused=1)
    assert ops(result.model) == ["Gemm"]
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, *a_shape)).astype(np.float32)})


@pytest.mark.parametrize("c_shape", [(1,), ()])
def test_gemm_c_that_grows_loses_its_stale_value_info(c_shape):
    """C of shape [1] or () becomes [N] in place: a value_info that states the old shape must go."""
    inits = [tensor("w", RNG.standard_normal((4, 5)).astype(np.float32)),
             tensor("c0", RNG.standard_normal(c_shape).astype(np.float32)),
             tensor("k", RNG.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w", "c0"], ["g"]), helper.make_node("Add", ["g", "k"], ["y"])]
    model = make_model(nodes, [value("x", [3, 4])], [value("y", [3, 5])], inits,
                       value_info=[value("c0", list(c_shape)), value("g", [3, 5])])
    result = fused(model, biases_fused=1)
    assert [v.name for v in result.model.graph.value_info] == []
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 3, 4)).astype(np.float32)})


def test_matmul_with_2d_input_becomes_gemm_and_nd_matmul_is_left():
    w = RNG.standard_normal((4, 5)).astype(np.float32)
    inits = [tensor("w", w), tensor("k", RNG.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "k"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4])], [value("y", ["n", 5])], inits)
    result = fused(model, biases_fused=1, matmuls_to_gemm=1)
    assert ops(result.model) == ["Gemm"] and result.model.graph.node[0].name == "fc"
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 2, 4)).astype(np.float32)})
    model = make_model(nodes, [value("x", ["n", 7, 4])], [value("y", ["n", 7, 5])], inits)
    fused(model, biases_fused=0, skipped_matmul_not_2d=1)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), *nodes]
    nodes[1].input[0] = "r"
    model = make_model(nodes, [value("x", ["n", 4]), value("s", ["k"], TensorProto.INT64)], [value("y", ["n", 5])],
                       inits)
    fused(model, biases_fused=0, skipped_matmul_rank_unknown=1)


def test_near_misses_are_kept_and_counted():
    # constants whose broadcast is not one value per channel, or grows the output
    fused(conv_add((1, 8, 6, 6)), skipped_not_per_channel=1)
    fused(conv_add((8,), size=8), skipped_not_per_channel=1)  # [C] lines up with the last (width) axis
    fused(conv_add((1, 1, 8, 1, 1), y_shape=[1, "n", 8, 6, 6]), skipped_broadcast_changes_shape=1)
    fused(conv_add((2, 8, 1, 1)), skipped_not_per_channel=1)  # varies along the batch axis
    fused(conv_add((1, 3, 1, 1), channels=1, y_shape=["n", 3, 6, 6]), skipped_broadcast_changes_shape=1)
    # the Conv output has another reader / is a graph output
    fused(conv_add((8, 1, 1), extra_nodes=[helper.make_node("Relu", ["c"], ["r"])]),
          skipped_output_has_other_readers=1)
    model = conv_add((8, 1, 1))
    model.graph.output.append(value("c", ["n", 8, 6, 6]))
    fused(model, skipped_output_is_graph_output=1)
    # the other operand is a runtime value / an overridable initializer
    model = conv_add((8, 1, 1))
    model.graph.node[1].input[1] = "x2"
    model.graph.input.append(value("x2", ["n", 8, 6, 6]))
    fused(model, skipped_runtime_operand=1)
    model = conv_add((8, 1, 1))
    model.graph.input.append(value("k", [8, 1, 1]))
    fused(model, skipped_runtime_operand=1)
    # Gemm: a constant that varies along the batch axis
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"]), helper.make_node("Add", ["g", "k"], ["y"])]
    model = make_model(nodes, [value("x", [3, 4])], [value("y", [3, 5])],
                       [tensor("w", np.ones((4, 5), np.float32)), tensor("k", np.ones((3, 5), np.float32))])
    fused(model, skipped_not_per_channel=1)
    # Gemm: a C of shape [M, 1] would grow to [M, N]
    nodes = [helper.make_node("Gemm", ["x", "w", "c0"], ["g"]), helper.make_node("Add", ["g", "k"], ["y"])]
    model = make_model(nodes, [value("x", [3, 4])], [value("y", [3, 5])],
                       [tensor("w", np.ones((4, 5), np.float32)), tensor("c0", np.ones((3, 1), np.float32)),
                        tensor("k", np.ones(5, np.float32))])
    fused(model, skipped_bias_would_grow=1)


def test_graph_output_name_is_kept_and_residual_add_is_counted():
    """y = Add(Conv(x)+k, x): the bias Add is fused (the Conv writes its output), the residual Add is not."""
    w = RNG.standard_normal((4, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "k"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c2", "x"], ["y"])]
    inits = [tensor("w", w), tensor("w2", w), tensor("k", RNG.standard_normal((4, 1, 1)).astype(np.float32))]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6])], [value("a", ["n", 4, 6, 6]), value("y", ["n", 4, 6, 6])],
                       inits)
    result = fused(model, biases_fused=1, skipped_runtime_operand=1)
    assert [n.output[0] for n in result.model.graph.node] == ["a", "c2", "y"]
    assert_within_gate(model, result.model, images((2, 1, 4, 6, 6)))


def test_inside_if_branches_local_and_outer_constants():
    def branch(name, k, inits):
        return helper.make_graph([helper.make_node("Conv", ["x", "w"], [f"{name}_c"], pads=[1, 1, 1, 1]),
                                  helper.make_node("Add", [f"{name}_c", k], [f"{name}_y"])], name, [],
                                 [value(f"{name}_y", ["n", 8, 6, 6])], initializer=inits)

    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    then_branch = branch("then", "k_local", [tensor("k_local", RNG.standard_normal((8, 1, 1)).astype(np.float32))])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                              else_branch=branch("else", "k_outer", []))]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6]), value("cond", [], TensorProto.BOOL)],
                       [value("y", ["n", 8, 6, 6])],
                       [tensor("w", w), tensor("k_outer", RNG.standard_normal((8, 1, 1)).astype(np.float32))])
    # the then-branch's Conv reads the outer weight: outer-scope weight; the else-branch adds an outer constant
    result = fused(model, biases_fused=0, skipped_outer_scope_weight=1)
    then_branch = branch("then", "k_local", [tensor("w", w), tensor("k_local", np.ones((8, 1, 1), np.float32))])
    else_branch = branch("else", "k_outer", [tensor("w", w)])
    model.graph.node[0].CopyFrom(helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                                                  else_branch=else_branch))
    result = fused(model, biases_fused=1, skipped_outer_scope_constant=1)
    x = RNG.standard_normal((2, 1, 4, 6, 6)).astype(np.float32)
    for c in (True, False):
        assert_within_gate(model, result.model, {"x": x, "cond": np.array([[c], [c]])})


def test_float16_constants_are_summed_wide_and_written_back():
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "k"], ["y"])]
    model = make_model(nodes, [value("x", ["n", 4, 6, 6], TensorProto.FLOAT16)],
                       [value("y", ["n", 8, 6, 6], TensorProto.FLOAT16)],
                       [tensor("w", w), tensor("b", RNG.standard_normal(8).astype(np.float16)),
                        tensor("k", RNG.standard_normal((8, 1, 1)).astype(np.float16))])
    result = fused(model, biases_fused=1)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float16)  # onnxruntime's CPU provider has no float16 Conv
    ref, out = (ReferenceEvaluator(m).run(None, {"x": x})[0].astype(np.float64) for m in (model, result.model))
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3 * float(np.sqrt(np.mean(ref**2))))


def test_dtype_mismatch_is_left():
    model = conv_add((8, 1, 1))
    model.graph.initializer[-1].CopyFrom(tensor("k", np.ones((8, 1, 1), np.float64)))
    result = FuseBias()(copy(model))  # an invalid model: the pass leaves it as it is
    assert not result.modified and result.stats["skipped_dtype_mismatch"] == 1


def test_ppocr_cls_every_conv_bias_add_fuses(shared_models):
    path = shared_models / "ppocr_cls" / "model.onnx"
    if not path.exists():
        pytest.skip("ppocr_cls is absent")
    model = onnx.load(path)
    result = fused(model, biases_fused=18, nodes_removed=72, skipped_matmul_rank_unknown=1)
    assert len(result.model.graph.node) == len(model.graph.node) - 72
    samples = list(itertools.islice(load_feeds(path.parent / "eval.npz"), 16))
    comparison = compare_outputs(run_model(model, samples), run_model(result.model, samples), Tolerances(), exact=True)
    assert comparison.failures == []
