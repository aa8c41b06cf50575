"""zero-rows: exact removal of dead channels on each graph pattern, with negative twins and properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxopt.data import load_feeds, random_feeds
from onnxopt.graph import model_graphs, parameter_count
from onnxopt.passes import prune_neurons, zero_rows
from onnxopt.passes.prune_neurons import PruneNeurons
from onnxopt.passes.zero_rows import ZeroRows
from onnxopt.validate import run_model

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
rng = np.random.default_rng(0)


def weight(*shape: int, dead: tuple[int, ...] = (), axis: int = 0) -> np.ndarray:
    """A random float32 weight whose slices ``dead`` along ``axis`` are zero."""
    w = rng.standard_normal(shape).astype(np.float32)
    index = [slice(None)] * len(shape)
    index[axis] = list(dead)
    w[tuple(index)] = 0
    return w


def make_model(nodes, inputs: dict[str, list], outputs: list[str], weights: dict[str, np.ndarray],
               opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)  # output shapes (and value_info, which must stay right)
    onnx.checker.check_model(model, full_check=True)
    return model


def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def zero_rows_exact(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Run zero-rows; the result passes the checker, matches the original and is a fixed point."""
    feeds, _ = random_feeds(model, count=3, seed=1)
    before = run_model(model, feeds)
    params = parameter_count(model.graph)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    result = ZeroRows()(work)
    onnx.checker.check_model(result.model, full_check=True)
    after = run_model(result.model, feeds)
    for name, values in before.items():
        reference = np.stack(values)  # float32 rounding of folded constants: relative to the output's scale
        np.testing.assert_allclose(np.stack(after[name]), reference, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(
            reference).max()))
    assert parameter_count(result.model.graph) <= params
    everywhere = [sum(parameter_count(g) for g in model_graphs(m)) for m in (model, result.model)]
    assert result.stats["parameters_removed"] == everywhere[0] - everywhere[1]  # subgraphs included
    again = ZeroRows()(result.model)
    assert not again.modified
    return result.model, result.stats


def dims(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    return tuple(next(t.dims for t in model.graph.initializer if t.name == name))


# --------------------------------------------------------------------------- Gemm / MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_dead_neurons_removed(trans_b):
    w1 = weight(8, 6, dead=(1, 4), axis=0 if trans_b else 1)
    b1 = rng.standard_normal(8 if trans_b else 6).astype(np.float32)
    b1[[1, 4]] = 0
    model = make_model(
        [node("Gemm", ["x", "w1", "b1"], "h", transB=trans_b), node("Relu", ["h"], "r"),
         node("Gemm", ["r", "w2", "b2"], "y", transB=trans_b)],
        {"x": [2, 6] if trans_b else [2, 8]}, ["y"],
        {"w1": w1, "b1": b1, "w2": weight(*((3, 8) if trans_b else (6, 3))), "b2": weight(3)},
    )
    out, stats = zero_rows_exact(model)
    assert stats == {"channels_removed": 2, "parameters_removed": 2 * (6 if trans_b else 8) + 2 + 2 * 3,
                     "skipped_graph_output": 1}
    assert dims(out, "w2") == ((3, 6) if trans_b else (4, 3))


def test_gemm_without_dead_neurons_unchanged():
    model = make_model(
        [node("Gemm", ["x", "w1", "b1"], "h", transB=1), node("Relu", ["h"], "r"),
         node("Gemm", ["r", "w2"], "y", transB=1)],
        {"x": [2, 5]}, ["y"], {"w1": weight(7, 5), "b1": weight(7), "w2": weight(3, 7)},
    )
    _, stats = zero_rows_exact(model)
    assert stats == {"channels_removed": 0, "parameters_removed": 0, "skipped_graph_output": 1}


@pytest.mark.parametrize("activation", ["Sigmoid", "Relu"])
def test_constant_activation_of_dead_neuron_folds_into_consumer_bias(activation):
    """sigmoid(bias) of a dead neuron is a non-zero constant: it must reach the next Gemm's bias."""
    b1 = np.array([0.5, 2.0, -1.0, 3.0], np.float32)
    model = make_model(
        [node("Gemm", ["x", "w1", "b1"], "h", transB=1), node(activation, ["h"], "a"),
         node("Gemm", ["a", "w2"], "y", transB=1, alpha=0.5)],
        {"x": [2, 5]}, ["y"], {"w1": weight(4, 5, dead=(1, 3)), "b1": b1, "w2": weight(3, 4)},
    )
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 2
    y_gemm = next(n for n in out.graph.node if n.output[0] == "y")
    assert len(y_gemm.input) == 3  # a bias was created for the folded constants


def test_matmul_2d_weight_with_bias_add_and_folded_constant():
    b1 = np.array([0.0, 1.5, 0.0, -2.0, 0.3], np.float32)
    model = make_model(
        [node("MatMul", ["x", "w1"], "m"), node("Add", ["m", "b1"], "h"), node("Tanh", ["h"], "t"),
         node("MatMul", ["t", "w2"], "y")],
        {"x": [2, 3, 4]}, ["y"], {"w1": weight(4, 5, dead=(1, 3), axis=1), "b1": b1, "w2": weight(5, 2)},
    )
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 2
    assert dims(out, "w1") == (4, 3) and dims(out, "b1") == (3,) and dims(out, "w2") == (3, 2)
    assert [n.op_type for n in out.graph.node][-1] == "Add"  # the folded tanh(b) constants


def test_graph_output_channels_stay():
    model = make_model([node("Gemm", ["x", "w1"], "y", transB=1)], {"x": [2, 5]}, ["y"],
                       {"w1": weight(4, 5, dead=(0,))})
    _, stats = zero_rows_exact(model)
    assert stats == {"channels_removed": 0, "parameters_removed": 0, "skipped_graph_output": 1,
                     "kept_dead_graph_output": 1}


def test_unknown_consumer_pins_and_is_counted():
    model = make_model(
        [node("Gemm", ["x", "w1"], "h", transB=1), node("Softmax", ["h"], "s", axis=1),
         node("Gemm", ["s", "w2"], "y", transB=1)],
        {"x": [2, 5]}, ["y"], {"w1": weight(4, 5, dead=(0,)), "w2": weight(3, 4)},
    )
    _, stats = zero_rows_exact(model)
    assert stats == {"channels_removed": 0, "parameters_removed": 0, "skipped_consumer_Softmax": 1,
                     "skipped_graph_output": 1, "kept_dead_consumer_Softmax": 1}


# --------------------------------------------------------------------------- Conv


def conv_bn(prefix: str, x: str, out_channels: int, in_channels: int, dead=(), kernel=1, pads=0, group=1,
            weights=None):
    """Conv (+bias) -> BatchNormalization nodes and their weights."""
    weights[f"{prefix}.w"] = weight(out_channels, in_channels // group, kernel, kernel, dead=dead)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    bias[list(dead)] = 0
    weights[f"{prefix}.b"] = bias
    for p, v in (("s", 1 + rng.random(out_channels)), ("o", rng.standard_normal(out_channels)),
                 ("m", rng.standard_normal(out_channels)), ("v", 0.5 + rng.random(out_channels))):
        weights[f"{prefix}.{p}"] = v.astype(np.float32)
    return [node("Conv", [x, f"{prefix}.w", f"{prefix}.b"], f"{prefix}.c", pads=[pads] * 4, group=group),
            node("BatchNormalization", [f"{prefix}.c", *(f"{prefix}.{p}" for p in "somv")], f"{prefix}.bn")]


@pytest.mark.parametrize(("pads", "removed"), [(0, 2), (1, 0)])
def test_conv_batchnorm_constant_needs_unpadded_consumer(pads, removed):
    """BN turns a dead filter into a non-zero constant: a 1x1 unpadded Conv folds it, a padded one cannot."""
    weights: dict = {}
    nodes = conv_bn("a", "x", 6, 3, dead=(2, 5), weights=weights)
    weights["w2"] = weight(4, 6, 3, 3)
    nodes.append(node("Conv", ["a.bn", "w2"], "y", pads=[pads] * 4))
    model = make_model(nodes, {"x": [1, 3, 6, 6]}, ["y"], weights)
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed


def test_padded_consumer_accepts_zero_constant():
    weights = {"w1": weight(5, 2, 3, 3, dead=(0, 3)), "w2": weight(4, 5, 3, 3)}
    model = make_model([node("Conv", ["x", "w1"], "c", pads=[1] * 4), node("Relu", ["c"], "r"),
                        node("Conv", ["r", "w2"], "y", pads=[1] * 4)], {"x": [1, 2, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 2 and dims(out, "w2") == (4, 3, 3, 3)


@pytest.mark.parametrize(("expand_bias", "removed"), [(False, 2), (True, 0)])
def test_depthwise_chain(expand_bias, removed):
    """expand -> relu -> depthwise (padded) -> relu -> project: a dead expand filter flows through the
    depthwise Conv (its group shrinks) unless its bias makes a constant that padding then distorts."""
    w1 = weight(6, 3, 1, 1, dead=(1, 4))
    b1 = np.where(np.isin(np.arange(6), [1, 4]), 1.0 if expand_bias else 0.0, 0.2).astype(np.float32)
    weights = {"w1": w1, "b1": b1, "dw": weight(6, 1, 3, 3), "w3": weight(4, 6, 1, 1)}
    model = make_model(
        [node("Conv", ["x", "w1", "b1"], "e"), node("Relu", ["e"], "er"),
         node("Conv", ["er", "dw"], "d", group=6, pads=[1] * 4), node("Relu", ["d"], "dr"),
         node("Conv", ["dr", "w3"], "y")],
        {"x": [1, 3, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed
    dw = next(n for n in out.graph.node if n.output[0] == "d")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 6 - removed


def test_dead_depthwise_filter_removes_the_channel_upstream_too():
    weights = {"w1": weight(4, 3, 1, 1), "dw": weight(4, 1, 3, 3, dead=(2,)), "w3": weight(5, 4, 1, 1)}
    model = make_model(
        [node("Conv", ["x", "w1"], "e"), node("Conv", ["e", "dw"], "d", group=4, pads=[1] * 4),
         node("Conv", ["d", "w3"], "y")], {"x": [1, 3, 4, 4]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 1 and dims(out, "w1") == (3, 3, 1, 1)


@pytest.mark.parametrize(("dead", "removed"), [((0, 3), 2), ((0,), 0), ((0, 1, 3), 2)])
def test_grouped_conv_consumer_loses_equally_many_inputs_per_group(dead, removed):
    """Groups of 2 input channels: (0 | 3) is balanced; (0 | -) is not; (0, 1 | 3) keeps one of group 0."""
    weights = {"w1": weight(4, 2, 1, 1, dead=dead), "b1": np.full(4, 0.3, np.float32),
               "g": weight(6, 2, 1, 1), "w3": weight(3, 6, 1, 1)}
    model = make_model(
        [node("Conv", ["x", "w1", "b1"], "e"), node("Sigmoid", ["e"], "s"), node("Conv", ["s", "g"], "d", group=2),
         node("Conv", ["d", "w3"], "y")], {"x": [1, 2, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed
    assert dims(out, "g") == (6, 2 - removed // 2, 1, 1)


@pytest.mark.parametrize(("dead", "removed"), [((1, 4), 2), ((1,), 0)])
def test_grouped_conv_producer_loses_equally_many_outputs_per_group(dead, removed):
    weights = {"g": weight(6, 2, 3, 3, dead=dead), "w3": weight(3, 6, 1, 1)}
    model = make_model([node("Conv", ["x", "g"], "d", group=2, pads=[1] * 4), node("Relu", ["d"], "r"),
                        node("Conv", ["r", "w3"], "y")], {"x": [1, 4, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed
    assert dims(out, "g") == (6 - removed, 2, 3, 3)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_conv_to_gemm_through_flatten_removes_channel_blocks(flatten):
    weights = {"w1": weight(4, 1, 3, 3, dead=(1,)), "b1": np.array([0.1, 0.7, -0.2, 0.4], np.float32),
               "w2": weight(3, 4 * 9), "shape": np.array([-1, 36], np.int64)}
    flat = (node("Flatten", ["p"], "f", axis=1) if flatten == "Flatten"
            else node("Reshape", ["p", "shape"], "f"))
    if flatten == "Flatten":
        del weights["shape"]
    model = make_model(
        [node("Conv", ["x", "w1", "b1"], "c"), node("Relu", ["c"], "r"),
         node("MaxPool", ["r"], "p", kernel_shape=[2, 2], strides=[2, 2]), flat,
         node("Gemm", ["f", "w2"], "y", transB=1)],
        {"x": [2, 1, 8, 8]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 1 and dims(out, "w2") == (3, 27)
    if flatten == "Reshape":
        assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "shape")).tolist() == [-1, 27]


def test_reshape_that_mixes_channels_is_pinned():
    weights = {"w1": weight(4, 1, 3, 3, dead=(1,)), "w2": weight(3, 6), "shape": np.array([-1, 6], np.int64)}
    model = make_model(
        [node("Conv", ["x", "w1"], "c"), node("Reshape", ["c", "shape"], "f"),
         node("Gemm", ["f", "w2"], "y", transB=1)], {"x": [2, 1, 5, 5]}, ["y"], weights)
    _, stats = zero_rows_exact(model)
    assert stats == {"channels_removed": 0, "parameters_removed": 0, "skipped_reshape_not_channel_blocks": 1,
                     "skipped_graph_output": 1, "kept_dead_reshape_not_channel_blocks": 1}


def test_concat_of_branches():
    weights = {"wa": weight(3, 2, 1, 1, dead=(1,)), "wb": weight(4, 2, 1, 1, dead=(0, 3)), "w3": weight(5, 7, 1, 1)}
    model = make_model(
        [node("Conv", ["x", "wa"], "a"), node("Conv", ["x", "wb"], "b"),
         node("Concat", ["a", "b"], "c", axis=1), node("Relu", ["c"], "r"), node("Conv", ["r", "w3"], "y")],
        {"x": [1, 2, 4, 4]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 3
    assert dims(out, "wa") == (2, 2, 1, 1) and dims(out, "wb") == (2, 2, 1, 1) and dims(out, "w3") == (5, 4, 1, 1)


@pytest.mark.parametrize(("dead_in_skip", "removed"), [((1, 2), 2), ((2,), 1), ((), 0)])
def test_residual_add_removes_only_channels_dead_in_every_branch(dead_in_skip, removed):
    """Channel 1 is dead in the residual branch; it goes only when also dead in the skip branch."""
    weights = {"w0": weight(4, 2, 1, 1, dead=dead_in_skip), "w1": weight(4, 4, 3, 3, dead=(1, 2)),
               "w2": weight(3, 4, 1, 1)}
    model = make_model(
        [node("Conv", ["x", "w0"], "s"), node("Relu", ["s"], "sr"),
         node("Conv", ["sr", "w1"], "b", pads=[1] * 4), node("Add", ["sr", "b"], "sum"),
         node("Conv", ["sum", "w2"], "y")],
        {"x": [1, 2, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed
    assert dims(out, "w2") == (3, 4 - removed, 1, 1)


def test_squeeze_excitation_mul_annihilates_and_per_channel_add():
    """x * sigmoid(fc(pool(x))): a dead x channel is 0 after the Mul whatever the SE branch says."""
    weights = {"w0": weight(4, 2, 1, 1, dead=(3,)), "se1": weight(2, 4, 1, 1), "se2": weight(4, 2, 1, 1),
               "se2b": weight(1, 4, 1, 1), "w3": weight(3, 4, 3, 3)}
    model = make_model(
        [node("Conv", ["x", "w0"], "c"), node("Relu", ["c"], "r"), node("GlobalAveragePool", ["r"], "g"),
         node("Conv", ["g", "se1"], "s1"), node("Relu", ["s1"], "s1r"), node("Conv", ["s1r", "se2"], "s2"),
         node("Add", ["s2", "se2b"], "s2b"), node("HardSigmoid", ["s2b"], "h"), node("Mul", ["r", "h"], "m"),
         node("Conv", ["m", "w3"], "y", pads=[1] * 4)],
        {"x": [1, 2, 5, 5]}, ["y"], weights)
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 1
    assert dims(out, "se2b") == (1, 3, 1, 1) and dims(out, "se1") == (2, 3, 1, 1)



def test_without_layers_no_shape_inference_runs(monkeypatch):
    """No MatMul / Gemm / Conv with a constant weight: nothing to remove, and no shape inference to pay."""
    def fail(model):
        raise AssertionError("shape inference ran")

    monkeypatch.setattr(zero_rows, "value_shapes", fail)
    monkeypatch.setattr(prune_neurons, "value_shapes", fail)
    model = make_model([node("MatMul", ["x", "w"], "m"), node("Relu", ["m"], "y")],
                       {"x": [2, 3], "w": [3, 4]}, ["y"], {})
    result = ZeroRows()(model)
    assert not result.modified and result.stats == {"channels_removed": 0, "parameters_removed": 0}
    result = PruneNeurons()(model)
    assert not result.modified and result.stats == {"neurons_zeroed": 0, "neurons_removable": 0, "neuron_groups": 0,
                                                    "skipped_nothing_prunable": 1}


def test_weights_in_constant_nodes_and_subgraphs():
    """An If branch holds its own MLP whose weights are Constant nodes: its dead neuron goes."""
    w1, w2 = weight(4, 3, dead=(2,), axis=1), weight(3, 2)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
         helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
         node("MatMul", ["x", "w1"], "h"), node("Relu", ["h"], "r"), node("MatMul", ["r", "w2"], "yb")],
        "branch", [], [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 2])])
    other = helper.make_graph([node("MatMul", ["x", "w3"], "yo")], "other", [],
                              [helper.make_tensor_value_info("yo", TensorProto.FLOAT, [2, 2])])
    model = make_model([node("If", ["cond"], "y", then_branch=branch, else_branch=other)],
                       {"x": [2, 4]}, ["y"], {"cond": np.array(True), "w3": weight(4, 2)})
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 1


def test_value_used_inside_a_subgraph_is_pinned():
    branch = helper.make_graph([node("Identity", ["h"], "yb")], "b", [],
                               [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 4])])
    model = make_model(
        [node("Gemm", ["x", "w1"], "h", transB=1), node("If", ["cond"], "y", then_branch=branch, else_branch=branch)],
        {"x": [2, 3]}, ["y"], {"w1": weight(4, 3, dead=(0,)), "cond": np.array(True)})
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 0 and stats["skipped_used_in_subgraph"] == 1


def test_shared_weight_is_left_whole():
    w1 = weight(4, 3, dead=(1,))
    model = make_model(
        [node("Gemm", ["x", "w1"], "a", transB=1), node("Gemm", ["x", "w1"], "b", transB=1),
         node("Add", ["a", "b"], "s"), node("Gemm", ["s", "w2"], "y", transB=1)],
        {"x": [2, 3]}, ["y"], {"w1": w1, "w2": weight(2, 4)})
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 0 and stats["skipped_shared_weight"] == 2


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    dead_fraction=st.floats(0, 1),
    activation=st.sampled_from(["Relu", "Sigmoid", "Tanh", "Identity"]),
    biased=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_zero_rows_preserves_outputs_and_never_adds_parameters(widths, dead_fraction, activation,
                                                                          biased, seed):
    local = np.random.default_rng(seed)
    nodes, weights, x = [], {}, "x"
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        w = local.standard_normal((n_out, n_in)).astype(np.float32)
        w[local.random(n_out) < dead_fraction] = 0
        weights[f"w{i}"] = w
        inputs = [x, f"w{i}"]
        if biased:
            weights[f"b{i}"] = local.standard_normal(n_out).astype(np.float32)
            inputs.append(f"b{i}")
        nodes += [node("Gemm", inputs, f"h{i}", transB=1), node(activation, [f"h{i}"], f"a{i}")]
        x = f"a{i}"
    nodes.append(node("Gemm", [x, "wout"], "y", transB=1))
    weights["wout"] = local.standard_normal((2, widths[-1])).astype(np.float32)
    zero_rows_exact(make_model(nodes, {"x": [3, widths[0]]}, ["y"], weights))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channels=st.integers(1, 3), group=st.sampled_from([1, 2]), dead=st.sets(st.integers(0, 5)),
       pads=st.integers(0, 1), residual=st.booleans(), seed=st.integers(0, 2**16))
def test_property_zero_rows_on_conv_blocks(channels, group, dead, pads, residual, seed):
    global rng
    rng = np.random.default_rng(seed)
    channels *= 2
    dead = tuple(d for d in dead if d < channels)
    pads = 1 if residual else pads  # the residual Add needs equal shapes
    weights: dict = {}
    nodes = conv_bn("a", "x", channels, 2, dead=dead, weights=weights)
    nodes.append(node("Relu", ["a.bn"], "r"))
    nodes += conv_bn("b", "r", channels, channels, dead=dead[:1], kernel=3, pads=pads, group=group, weights=weights)
    last = "b.bn"
    if residual:
        nodes.append(node("Add", ["r", "b.bn"], "sum"))
        last = "sum"
    weights["wy"] = weight(3, channels, 1, 1)
    nodes.append(node("Conv", [last, "wy"], "y"))
    size = 4 + 2 * (1 - pads)
    zero_rows_exact(make_model(nodes, {"x": [1, 2, size, size]}, ["y"], weights))


# --------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.skipif(not MODELS.is_dir(), reason="../shared/models is absent")
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "ppocr_cls"])
def test_prune_neurons_then_zero_rows_exact_on_real_models(name):
    model = onnx.load(MODELS / name / "model.onnx")
    feeds = load_feeds(MODELS / name / "eval.npz").head(16)
    pruned = PruneNeurons(PruneNeurons.Options(ratio=0.5))(model)
    zeroed = pruned.stats["neurons_zeroed"]
    assert zeroed > 0
    before = run_model(pruned.model, feeds)
    work = onnx.ModelProto()
    work.CopyFrom(pruned.model)
    result = ZeroRows()(work)
    assert result.stats["channels_removed"] == zeroed
    onnx.checker.check_model(result.model, full_check=True)
    after = run_model(result.model, feeds)
    for out, values in before.items():
        ref, got = np.stack(values), np.stack(after[out])
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert not ZeroRows()(result.model).modified
