import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxopt.data import load_feeds
from onnxopt.passes import quantize as quantize_module
from onnxopt.passes.bias_rewrite import fold_batchnorm
from onnxopt.passes.fold_batchnorm import FoldBatchNorm
from onnxopt.validate import Tolerances, check_structure, compare_outputs, run_model

from conftest import make_model, tensor, value

RNG = np.random.default_rng(0)


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def assert_within_gate(a, b, feeds, rtol=1e-5, atol=1e-6):
    """The exact-pass gate: every element within atol + rtol * (|ref| + rms(ref))."""
    samples = [dict(zip(feeds, v)) for v in zip(*feeds.values())]
    comparison = compare_outputs(run_model(a, samples), run_model(b, samples),
                                 Tolerances(exact_rtol=rtol, exact_atol=atol), exact=True)
    assert comparison.failures == []


def folded(model, check=True, **expect):
    """Run the pass on a copy; check validity, stats and idempotence; return the result."""
    result = FoldBatchNorm()(copy(model))
    if check:
        assert check_structure(result.model) is None
    for key, n in expect.items():
        assert result.stats.get(key, 0) == n, (key, result.stats)
    assert all(isinstance(v, int) for v in result.stats.values())
    assert result.modified == (result.stats["batchnorms_folded"] > 0)
    again = FoldBatchNorm()(copy(result.model))
    assert not again.modified
    return result


def bn_params(prefix, c, dtype=np.float32):
    return [tensor(f"{prefix}_scale", RNG.uniform(0.5, 2, c).astype(dtype)),
            tensor(f"{prefix}_b", RNG.standard_normal(c).astype(dtype)),
            tensor(f"{prefix}_mean", RNG.standard_normal(c).astype(dtype)),
            tensor(f"{prefix}_var", RNG.uniform(0.1, 3, c).astype(dtype))]


def bn(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_b", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], name=prefix, **attrs)


def ops(model):
    return [n.op_type for n in model.graph.node]


def images(shape=(3, 1, 4, 8, 8)):
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_batchnorm_folds_into_weight_and_bias(with_bias, group):
    inits = [tensor("w", RNG.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)), *bn_params("bn", 8)]
    inputs = ["x", "w"]
    if with_bias:
        inits.append(tensor("b", RNG.standard_normal(8).astype(np.float32)))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], group=group, name="conv"),
             bn("c", "y", epsilon=1e-3)]
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8])], inits,
                       value_info=[value("c", ["n", 8, 8, 8])])
    result = folded(model, batchnorms_folded=1, nodes_removed=1, initializers_removed=4)
    assert ops(result.model) == ["Conv"]
    conv = result.model.graph.node[0]
    assert conv.output == ["y"] and len(conv.input) == 3
    assert {t.name for t in result.model.graph.initializer} == {"w", conv.input[2]}
    assert [v.name for v in result.model.graph.value_info] == []  # the Conv's old output went
    assert_within_gate(model, result.model, images())


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_scales_output_channels_per_group(group):
    inits = [tensor("w", RNG.standard_normal((4, 6 // group, 3, 3)).astype(np.float32)), *bn_params("bn", 6)]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2], group=group), bn("c", "y")]
    model = make_model(nodes, [value("x", ["n", 4, 5, 5])], [value("y", ["n", 6, 11, 11])], inits)
    result = folded(model, batchnorms_folded=1)
    assert ops(result.model) == ["ConvTranspose"]
    assert_within_gate(model, result.model, images((3, 1, 4, 5, 5)))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), ()])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
def test_gemm_batchnorm_respects_c_alpha_beta_and_transpose(trans_b, c_shape, alpha, beta):
    w = RNG.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [tensor("w", w), *bn_params("bn", 6)]
    inputs = ["x", "w"]
    if c_shape is not None:
        inits.append(tensor("c0", RNG.standard_normal(c_shape).astype(np.float32)))
        inputs.append("c0")
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=alpha, beta=beta), bn("g", "y")]
    model = make_model(nodes, [value("x", ["n", 5])], [value("y", ["n", 6])], inits)
    result = folded(model, batchnorms_folded=1)
    assert ops(result.model) == ["Gemm"]
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 4, 5)).astype(np.float32)})


def test_gemm_c_that_grows_loses_its_stale_value_info():
    """A scalar C becomes [N] in place: a value_info that states the old shape must go."""
    inits = [tensor("w", RNG.standard_normal((5, 6)).astype(np.float32)), tensor("c0", np.float32(0.5)),
             *bn_params("bn", 6)]
    nodes = [helper.make_node("Gemm", ["x", "w", "c0"], ["g"]), bn("g", "y")]
    model = make_model(nodes, [value("x", ["n", 5])], [value("y", ["n", 6])], inits, value_info=[value("c0", [])])
    result = folded(model, batchnorms_folded=1)
    assert list(result.model.graph.value_info) == []
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 4, 5)).astype(np.float32)})


def test_matmul_with_2d_input_becomes_gemm():
    inits = [tensor("w", RNG.standard_normal((5, 6)).astype(np.float32)), *bn_params("bn", 6)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), bn("m", "y")]
    model = make_model(nodes, [value("x", ["n", 5])], [value("y", ["n", 6])], inits)
    result = folded(model, batchnorms_folded=1, matmuls_to_gemm=1)
    assert ops(result.model) == ["Gemm"]
    assert result.model.graph.node[0].name == "fc"
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 4, 5)).astype(np.float32)})


def test_matmul_other_ranks_are_left():
    # BatchNormalization normalises axis 1; a 3-D MatMul's channels are on the last axis
    inits = [tensor("w", RNG.standard_normal((5, 6)).astype(np.float32)), *bn_params("bn", 4)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), bn("m", "y")]
    model = make_model(nodes, [value("x", [2, 4, 5])], [value("y", [2, 4, 6])], inits)
    result = folded(model, batchnorms_folded=0, skipped_matmul_not_2d=1)
    assert result.model.SerializeToString() == model.SerializeToString()
    # a rank nobody can tell (the input is reshaped by a runtime shape of unknown length)
    inits = [tensor("w", RNG.standard_normal((5, 6)).astype(np.float32)), *bn_params("bn", 6)]
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["m"]),
             bn("m", "y")]
    model = make_model(nodes, [value("x", ["n", 5]), value("s", ["k"], TensorProto.INT64)], [value("y", ["n", 6])],
                       inits)
    folded(model, batchnorms_folded=0, skipped_matmul_rank_unknown=1)


def conv_bn_model(**kwargs):
    inits = [tensor("w", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)), *bn_params("bn", 8)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn("c", "y", **kwargs)]
    return nodes, inits


def test_near_misses_are_kept_and_counted():
    # the Conv output has another reader
    nodes, inits = conv_bn_model()
    nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8]), value("r", ["n", 8, 8, 8])],
                       inits)
    assert folded(model, skipped_output_has_other_readers=1, batchnorms_folded=0).model.SerializeToString() == \
        model.SerializeToString()
    # the Conv output is a graph output
    nodes, inits = conv_bn_model()
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8]), value("c", ["n", 8, 8, 8])],
                       inits)
    folded(model, skipped_output_is_graph_output=1, batchnorms_folded=0)
    # the weight is shared with another Conv
    nodes, inits = conv_bn_model()
    nodes.append(helper.make_node("Conv", ["x", "w"], ["other"], pads=[1, 1, 1, 1]))
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8]),
                                                                value("other", ["n", 8, 8, 8])], inits)
    folded(model, skipped_shared_weight=1, batchnorms_folded=0)
    # a parameter is an initializer that is also a graph input (overridable at run time)
    nodes, inits = conv_bn_model()
    model = make_model(nodes, [value("x", ["n", 4, 8, 8]), value("bn_mean", [8])], [value("y", ["n", 8, 8, 8])], inits)
    folded(model, skipped_runtime_parameters=1, batchnorms_folded=0)
    # no foldable producer
    inits = bn_params("bn", 4)
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), bn("r", "y")], [value("x", ["n", 4, 8, 8])],
                       [value("y", ["n", 4, 8, 8])], inits)
    folded(model, skipped_no_foldable_producer=1, batchnorms_folded=0)


def test_training_mode_is_left():
    nodes, inits = conv_bn_model(training_mode=1)
    nodes[-1].output.extend(["running_mean", "running_var"])
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8])], inits, opset=15)
    folded(model, skipped_training_mode=1, batchnorms_folded=0)


def test_constant_node_weights_and_parameters_chain_of_two_batchnorms():
    """Constant nodes everywhere; Conv -> BN -> BN folds both in one run; the Constants go."""
    def const(name, array):
        return helper.make_node("Constant", [], [name], value=tensor(name, array))

    params = bn_params("bn1", 6) + bn_params("bn2", 6)
    nodes = [const("w", RNG.standard_normal((6, 3, 3)).astype(np.float32)),
             const("b", RNG.standard_normal(6).astype(np.float32)),
             *[const(t.name, onnx.numpy_helper.to_array(t)) for t in params],
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1]),
             bn("c", "y1", "bn1"), bn("y1", "y", "bn2")]
    model = make_model(nodes, [value("x", ["n", 3, 10])], [value("y", ["n", 6, 10])])
    result = folded(model, batchnorms_folded=2, nodes_removed=10)
    assert ops(result.model) == ["Constant", "Constant", "Conv"]
    assert not result.model.graph.initializer  # the bias was changed in place in its Constant node
    assert_within_gate(model, result.model, {"x": RNG.standard_normal((3, 2, 3, 10)).astype(np.float32)})


def test_shared_bias_gets_a_new_initializer_and_the_other_reader_keeps_it():
    nodes, inits = conv_bn_model()
    nodes[0].input.append("b")
    nodes.append(helper.make_node("Add", ["x", "b4"], ["z"]))
    inits += [tensor("b", RNG.standard_normal(8).astype(np.float32)),
              tensor("b4", RNG.standard_normal((4, 1, 1)).astype(np.float32))]
    nodes.append(helper.make_node("Conv", ["z", "w2", "b"], ["other"]))
    inits.append(tensor("w2", RNG.standard_normal((8, 4, 1, 1)).astype(np.float32)))
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8]), value("other", ["n", 8, 8, 8])],
                       inits)
    result = folded(model, batchnorms_folded=1)
    assert result.model.graph.node[0].input[2] != "b"
    assert "b" in {t.name for t in result.model.graph.initializer}
    assert_within_gate(model, result.model, images())


def test_float16_and_double_weights_are_computed_wide_and_written_back():
    for dtype, elem, rtol in ((np.float16, TensorProto.FLOAT16, 2e-3), (np.float64, TensorProto.DOUBLE, 1e-5)):
        inits = [tensor("w", RNG.standard_normal((8, 4, 3, 3)).astype(dtype)), *bn_params("bn", 8, dtype)]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn("c", "y")]
        model = make_model(nodes, [value("x", ["n", 4, 8, 8], elem)], [value("y", ["n", 8, 8, 8], elem)], inits)
        result = folded(model, batchnorms_folded=1)
        assert {t.data_type for t in result.model.graph.initializer} == {elem}
        # onnxruntime's CPU provider has no float16 Conv: the ONNX reference runs both
        x = RNG.standard_normal((2, 4, 8, 8)).astype(dtype)
        ref, out = (ReferenceEvaluator(m).run(None, {"x": x})[0] for m in (model, result.model))
        np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=rtol,
                                   atol=rtol * float(np.sqrt(np.mean(np.square(ref.astype(np.float64))))))


def test_inside_if_branches_with_local_and_outer_weights():
    """A body folds its own Conv+BN; a body Conv whose weight is an outer value is skipped and counted."""
    def branch(name, weight, inits):
        return helper.make_graph([helper.make_node("Conv", ["x", weight], [f"{name}_c"], pads=[1, 1, 1, 1]),
                                  bn(f"{name}_c", f"{name}_y", f"{name}_bn")], name, [],
                                 [value(f"{name}_y", ["n", 8, 8, 8])], initializer=inits)

    local = [tensor("w_then", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)), *bn_params("then_bn", 8)]
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "w_then", local),
                              else_branch=branch("else", "w_outer", bn_params("else_bn", 8)))]
    model = make_model(nodes, [value("x", ["n", 4, 8, 8]), value("cond", [], TensorProto.BOOL)],
                       [value("y", ["n", 8, 8, 8])], [tensor("w_outer", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32))])
    result = folded(model, batchnorms_folded=1, skipped_outer_scope_weight=1)
    x = RNG.standard_normal((2, 1, 4, 8, 8)).astype(np.float32)
    for c in (True, False):
        assert_within_gate(model, result.model, {"x": x, "cond": np.array([[c], [c]])})


def test_external_weights_stay_external(tmp_path):
    from onnxopt.modelio import load_model, save_model

    nodes, inits = conv_bn_model()
    model = make_model(nodes, [value("x", ["n", 4, 8, 8])], [value("y", ["n", 8, 8, 8])], inits)
    save_model(model, tmp_path / "m.onnx", external=True)
    loaded = load_model(tmp_path / "m.onnx")
    result = folded(loaded, check=False, batchnorms_folded=1)
    w = next(t for t in result.model.graph.initializer if t.name == "w")
    assert w.data_location == TensorProto.EXTERNAL  # rewritten into the spill file, not into memory
    save_model(result.model, tmp_path / "out.onnx", external=True)
    assert check_structure(result.model, tmp_path / "out.onnx") is None
    assert_within_gate(model, result.model, images())


def test_quantize_uses_this_folding():
    assert quantize_module.fold_batchnorm is fold_batchnorm
    assert not hasattr(quantize_module, "_fold_batchnorm")


def test_ppocr_cls_every_batchnorm_folds(shared_models):
    path = shared_models / "ppocr_cls" / "model.onnx"
    if not path.exists():
        pytest.skip("ppocr_cls is absent")
    model = onnx.load(path)
    result = folded(model, batchnorms_folded=35, nodes_removed=175)
    assert "BatchNormalization" not in ops(result.model)
    samples = list(itertools.islice(load_feeds(path.parent / "eval.npz"), 16))
    comparison = compare_outputs(run_model(model, samples), run_model(result.model, samples), Tolerances(), exact=True)
    assert comparison.failures == []
