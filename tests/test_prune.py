"""prune and prune-neurons: exact targets, patterns, Wanda ranking, tied weights, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_zero_rows import make_model, node, weight, zero_rows_exact

from onnxopt.data import FeedSet
from onnxopt.errors import InputError
from onnxopt.graph import WeightStore
from onnxopt.passes.base import PassContext
from onnxopt.passes.prune import Prune, global_kth, smallest_mask, threshold_mask
from onnxopt.passes.prune_neurons import PruneNeurons, rounded_count
from onnxopt.passes.zero_rows import ZeroRows
from onnxopt.validate import run_model


def mlp(w1: np.ndarray, w2: np.ndarray, trans_b: int = 1) -> onnx.ModelProto:
    n_in = w1.shape[1] if trans_b else w1.shape[0]
    return make_model(
        [node("Gemm", ["x", "w1", "b1"], "h", transB=trans_b), node("Relu", ["h"], "r"),
         node("Gemm", ["r", "w2"], "y", transB=trans_b)],
        {"x": [2, n_in]}, ["y"], {"w1": w1, "b1": weight(w1.shape[0] if trans_b else w1.shape[1]), "w2": w2})


def array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def prune(model: onnx.ModelProto, calib=None, **options):
    return Prune(Prune.Options(**options), PassContext(calib=calib))(model)


def zeros(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(a))


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_layer_scope_meets_target_per_tensor(sparsity):
    model = mlp(weight(10, 7), weight(3, 10))
    result = prune(model, sparsity=sparsity)
    for name, size in (("w1", 70), ("w2", 30)):
        assert zeros(array(result.model, name)) == int(np.floor(sparsity * size + 0.5))
    assert result.stats["weights_eligible"] == 100 and result.stats["tensors_pruned"] == (2 if sparsity else 0)
    assert zeros(array(result.model, "b1")) == 0  # biases are not weights


def test_ties_and_existing_zeros_count():
    w1 = np.ones((4, 5), np.float32)
    w1[0, :3] = 0  # 3 zeros already
    result = prune(mlp(w1, weight(2, 4)), sparsity=0.5)
    pruned = array(result.model, "w1")
    assert zeros(pruned) == 10 and (pruned[0, :3] == 0).all()  # 7 more among 17 equal values
    assert result.stats["weights_zero_before"] == 3


def test_global_scope_meets_overall_target_and_ranks_across_tensors():
    small, large = weight(6, 5) * 0.01, weight(3, 6)
    result = prune(mlp(small, large), sparsity=0.5, scope="global")
    assert result.stats["weights_zero_after"] == 24 and result.stats["sparsity"] == 0.5
    assert zeros(array(result.model, "w1")) > zeros(array(result.model, "w2"))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_2_4_keeps_two_largest_of_every_four_inputs(trans_b):
    w1 = weight(6, 8) if trans_b else weight(8, 6)
    result = prune(mlp(w1, weight(3, 6) if trans_b else weight(6, 3), trans_b), sparsity=0.5, pattern="2:4")
    pruned = array(result.model, "w1")
    rows = pruned if trans_b else pruned.T  # (out, in)
    original = w1 if trans_b else w1.T
    blocks, kept_from = rows.reshape(6, 2, 4), np.abs(original).reshape(6, 2, 4)
    assert ((blocks != 0).sum(axis=-1) == 2).all()
    assert (np.sort(kept_from, axis=-1)[..., 2:] == np.sort(np.abs(blocks), axis=-1)[..., 2:]).all()
    assert result.stats["skipped_inputs_not_divisible_by_m"] == 1  # w2's 6 inputs


def test_2_4_on_conv_groups_input_channels():
    w = weight(3, 8, 3, 3)
    model = make_model([node("Conv", ["x", "w"], "y")], {"x": [1, 8, 5, 5]}, ["y"], {"w": w})
    pruned = array(prune(model, sparsity=0.5, pattern="2:4").model, "w")
    by_input = np.moveaxis(pruned, 1, -1).reshape(3, 3, 3, 2, 4)
    assert ((by_input != 0).sum(axis=-1) == 2).all()


def test_tied_weight_pruned_once_consistently():
    shared = weight(5, 5)
    model = make_model([node("MatMul", ["x", "w"], "a"), node("MatMul", ["a", "w"], "y")],
                       {"x": [2, 5]}, ["y"], {"w": shared})
    result = prune(model, sparsity=0.4)
    assert result.stats["tensors_pruned"] == 1 and zeros(array(result.model, "w")) == 10


def test_exclude_min_size_and_other_uses_are_counted():
    model = make_model(
        [node("MatMul", ["x", "big"], "a"), node("MatMul", ["a", "small"], "b"), node("MatMul", ["b", "skip"], "c"),
         node("MatMul", ["c", "shared"], "d"), node("Add", ["d", "shared"], "y")],
        {"x": [4, 6]}, ["y"],
        {"big": weight(6, 6), "small": weight(6, 2), "skip": weight(2, 4), "shared": weight(4, 4)})
    result = prune(model, sparsity=0.5, exclude=("sk*",), min_size=13)
    assert result.stats == {"tensors_pruned": 1, "weights_eligible": 36, "weights_zero_before": 0,
                            "weights_zero_after": 18, "sparsity": 0.5, "skipped_excluded": 1,
                            "skipped_below_min_size": 1, "skipped_weight_has_other_uses": 1}


def test_constant_node_weights_inside_a_subgraph():
    w = weight(4, 4)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)), node("MatMul", ["x", "w"], "yb")],
        "b", [], [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 4])])
    model = make_model([node("If", ["cond"], "y", then_branch=branch, else_branch=branch)],
                       {"x": [2, 4]}, ["y"], {"cond": np.array(True)})
    result = prune(model, sparsity=0.25)
    const = model.graph.node[0].attribute[0].g.node[0]
    assert result.stats["weights_zero_after"] == 8  # both branches hold a copy: 4 of 16 each
    assert zeros(numpy_helper.to_array(const.attribute[0].t)) == 4


# --------------------------------------------------------------------------- Wanda


def test_wanda_protects_weights_on_loud_inputs():
    """Input 0 is 100x louder: Wanda keeps its small weights, magnitude drops them."""
    w = np.array([[0.1, 0.2], [1.0, 0.7], [0.9, 1.1], [0.8, 0.6]], np.float32)  # (in, out): input 0 weighs least
    def model():
        return make_model([node("MatMul", ["x", "w"], "y")], {"x": [1, 4]}, ["y"], {"w": w})

    samples = np.random.default_rng(0).standard_normal((16, 1, 4)).astype(np.float32) * [100, 1, 1, 1]
    calib = FeedSet({"x": samples.astype(np.float32)}, "test")
    magnitude = array(prune(model(), sparsity=0.25).model, "w")
    wanda = array(prune(model(), calib=calib, sparsity=0.25, method="wanda", bias_correction=False).model, "w")
    assert (magnitude[0] == 0).all() and (wanda[0] != 0).all()
    norms = np.sqrt((samples.reshape(-1, 4).astype(np.float64) ** 2).sum(axis=0))
    score = np.abs(w) * norms[:, None]
    assert set(zip(*np.nonzero(wanda == 0))) == set(zip(*np.unravel_index(np.argsort(score, axis=None)[:2], w.shape)))


def linear_calib(means, stds, n=32, seed=0) -> FeedSet:
    rng = np.random.default_rng(seed)
    return FeedSet({"x": (rng.standard_normal((n, 1, len(means))) * stds + means).astype(np.float32)}, "test")


def run_calib(model: onnx.ModelProto, calib: FeedSet) -> np.ndarray:
    return np.concatenate(run_model(model, calib)[model.graph.output[0].name])


@pytest.mark.parametrize("op", ["Gemm", "MatMul", "Conv"])
def test_wanda_bias_correction_keeps_the_mean_output_on_the_calibration_data(op):
    """Adding back sum(pruned w * mean(x)) makes a linear layer's mean output exactly the dense one."""
    calib = linear_calib(means=[3.0, -2.0, 0.5, 4.0], stds=[1.0, 0.5, 2.0, 0.1])
    if op == "Conv":  # unpadded 1x1: channels as features
        calib = FeedSet({"x": calib.arrays["x"].reshape(32, 1, 4, 1, 1)}, "test")

    w = weight(4, 5) if op == "MatMul" else weight(5, 4, 1, 1) if op == "Conv" else weight(5, 4)
    weights = {"w": w} if op == "MatMul" else {"w": w, "b": weight(5)}

    def model():
        inputs = ["x", "w"] if op == "MatMul" else ["x", "w", "b"]
        attrs = {"transB": 1, "alpha": 0.5} if op == "Gemm" else {}
        return make_model([node(op, inputs, "y", **attrs)], {"x": [1, 4, 1, 1] if op == "Conv" else [1, 4]}, ["y"],
                          {k: v.copy() for k, v in weights.items()})

    dense = run_calib(model(), calib).mean(axis=0)
    corrected = prune(model(), calib=calib, sparsity=0.5, method="wanda")
    plain = prune(model(), calib=calib, sparsity=0.5, method="wanda", bias_correction=False)
    assert corrected.stats["biases_corrected"] == 1 and "biases_corrected" not in plain.stats
    np.testing.assert_allclose(run_calib(corrected.model, calib).mean(axis=0), dense, rtol=1e-5, atol=1e-5)
    assert np.abs(run_calib(plain.model, calib).mean(axis=0) - dense).max() > 0.1
    assert [n.op_type for n in corrected.model.graph.node] == ([op, "Add"] if op == "MatMul" else [op])
    assert corrected.model.graph.node[-1].output[0] == "y"


def test_wanda_bias_correction_ranks_by_spread_about_the_mean():
    """Input 0 is loud but nearly constant: its mean goes into the bias, so its weights are cheap to prune."""
    w = np.ones((2, 3), np.float32)  # (in, out)
    calib = linear_calib(means=[10.0, 0.0], stds=[0.01, 1.0])

    def pruned(**options):
        model = make_model([node("MatMul", ["x", "w"], "y")], {"x": [1, 2]}, ["y"], {"w": w})
        return array(prune(model, calib=calib, sparsity=0.5, method="wanda", **options).model, "w")

    assert (pruned()[0] == 0).all() and (pruned()[1] != 0).all()
    assert (pruned(bias_correction=False)[1] == 0).all() and (pruned(bias_correction=False)[0] != 0).all()


def test_wanda_bias_correction_copies_a_shared_bias():
    model = make_model([node("Gemm", ["x", "w1", "b"], "h", transB=1), node("Gemm", ["h", "w2", "b"], "y", transB=1)],
                       {"x": [1, 4]}, ["y"], {"w1": weight(4, 4), "w2": weight(4, 4), "b": weight(4)})
    bias = array(model, "b").copy()
    result = prune(model, calib=linear_calib(means=[1.0] * 4, stds=[1.0] * 4), sparsity=0.5, method="wanda")
    assert (array(result.model, "b") == bias).all()
    assert [n.input[2] for n in result.model.graph.node] == ["b_bias", "b_bias_1"]


def test_wanda_without_calibration_is_an_input_error():
    with pytest.raises(InputError, match="calibration"):
        prune(mlp(weight(4, 3), weight(2, 4)), method="wanda")


@pytest.mark.parametrize("options", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"method": "random"},
                                     {"scope": "model"}, {"pattern": "4:2"}, {"pattern": "2:4", "sparsity": 0.3},
                                     {"pattern": "2:4", "scope": "global"}, {"min_size": -1}])
def test_bad_options_are_one_line_input_errors(options):
    with pytest.raises(InputError) as info:
        Prune.Options(**options)
    assert "\n" not in str(info.value) and str(info.value).startswith("prune:")


def test_nothing_prunable_is_a_stat_not_an_error():
    model = make_model([node("Relu", ["x"], "y")], {"x": [2, 3]}, ["y"], {})
    result = prune(model, sparsity=0.5)
    assert not result.modified and result.stats["skipped_nothing_prunable"] == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 8), cols=st.integers(1, 8), sparsity=st.floats(0, 0.99),
       scope=st.sampled_from(["layer", "global"]), quantized=st.booleans(), seed=st.integers(0, 2**16))
def test_property_prune_meets_target_and_keeps_the_largest(rows, cols, sparsity, scope, quantized, seed):
    local = np.random.default_rng(seed)
    w1, w2 = local.standard_normal((rows, cols)), local.standard_normal((2, rows))
    if quantized:  # many ties
        w1, w2 = np.round(w1), np.round(w2)
    model = mlp(w1.astype(np.float32), w2.astype(np.float32))
    result = prune(model, sparsity=sparsity, scope=scope)
    before, after = [np.abs(w.astype(np.float32)).ravel() for w in (w1, w2)], [
        np.abs(array(result.model, n)).ravel() for n in ("w1", "w2")]
    scopes = [(np.concatenate(before), np.concatenate(after))] if scope == "global" else list(zip(before, after))
    for old, new in scopes:
        assert zeros(new) == max(int(np.floor(sparsity * old.size + 0.5)), zeros(old))
        pruned, kept = old[(new == 0) & (old != 0)], new[new != 0]
        assert pruned.size == 0 or kept.size == 0 or pruned.max() <= kept.min()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), fraction=st.floats(0, 1),
       levels=st.integers(1, 6), zeros_share=st.floats(0, 0.9), sample=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_property_global_kth_is_the_kth_of_everything(sizes, fraction, levels, zeros_share, sample, seed):
    """Any sample size (1 forces wrong brackets and their widening), ties, many existing zeros (-1)."""
    local = np.random.default_rng(seed)
    scores = [np.round(local.random(n) * levels).astype(np.float32) for n in sizes]
    for s in scores:
        s[local.random(s.size) < zeros_share] = -1.0
    everything = np.sort(np.concatenate(scores))
    k = min(everything.size, max(1, round(fraction * everything.size)))
    kth, smaller = global_kth(lambda: iter(scores), sizes, k, sample=sample, seed=seed)
    assert kth == everything[k - 1] and smaller == int(np.count_nonzero(everything < kth))


@pytest.mark.parametrize("k", [0, 1, 7, 12, 24])
def test_smallest_mask_on_a_transposed_view_picks_exactly_k_and_marks_the_view(k):
    stored = np.round(np.random.default_rng(3).random((4, 6)) * 3).astype(np.float32)  # ties
    score = stored.T  # the canonical view of a MatMul weight: not C-contiguous
    mask = smallest_mask(score, k)
    assert mask.shape == score.shape and int(mask.sum()) == k
    assert k in (0, score.size) or score[mask].max() <= score[~mask].min()
    assert int(threshold_mask(score, 1.0, 0).sum()) == int((score < 1.0).sum())


def test_global_scope_reads_each_weight_a_bounded_number_of_times(monkeypatch):
    """The threshold comes from passes over the weights, never from all of them held at once."""
    from onnxopt.passes import weights as weights_module

    reads = []
    original = weights_module.PrunableTensor.canonical
    monkeypatch.setattr(weights_module.PrunableTensor, "canonical",
                        lambda self, out=None: reads.append(self.name) or original(self, out))
    prune(mlp(weight(6, 5), weight(3, 6)), sparsity=0.5, scope="global")
    assert sorted(reads) == sorted(["w1", "w2"] * 3)  # sample, window, prune: one tensor at a time


# --------------------------------------------------------------------------- prune-neurons


def test_prune_neurons_zeroes_rows_that_zero_rows_removes():
    w1 = weight(8, 5)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, round_to=1))(mlp(w1, weight(3, 8)))
    assert result.stats == {"neurons_zeroed": 4, "neurons_removable": 8, "neuron_groups": 2,
                            "skipped_graph_output": 1, "unprunable_graph_output": 3}
    dead = ~array(result.model, "w1").any(axis=1)
    assert set(np.flatnonzero(dead)) == set(np.argsort(np.linalg.norm(w1, axis=1))[:4])
    assert (array(result.model, "b1")[dead] == 0).all()
    out, stats = zero_rows_exact(result.model)
    assert stats["channels_removed"] == 4 and array(out, "w2").shape == (3, 4)



@pytest.mark.parametrize("method", ["l2", "wanda", "fluctuation"])
def test_prune_neurons_reads_each_weight_once(monkeypatch, method):
    """Scoring reads a weight; the analysis takes its channel count from the dims and zeroing reuses the read."""
    reads: dict[str, int] = {}
    original = WeightStore.array

    def counting(self, name, out=None):
        reads[name] = reads.get(name, 0) + 1
        return original(self, name, out)

    model = mlp(weight(8, 5), weight(3, 8))
    monkeypatch.setattr(WeightStore, "array", counting)
    calib = FeedSet({"x": np.random.default_rng(0).standard_normal((8, 2, 5)).astype(np.float32)}, "test")
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, round_to=1, method=method), PassContext(calib=calib))(model)
    assert result.stats["neurons_zeroed"] == 4
    assert reads["w1"] == 1 and reads["w2"] == 1


def test_prune_neurons_picks_the_weakest_neurons():
    w1 = weight(6, 4)
    w1[[1, 4]] *= 0.01
    result = PruneNeurons(PruneNeurons.Options(ratio=0.34))(mlp(w1, weight(2, 6)))
    assert set(np.flatnonzero(~array(result.model, "w1").any(axis=1))) == {1, 4}


def test_prune_neurons_skips_channels_zero_rows_could_not_remove():
    """Conv -> BN -> padded Conv: a zeroed filter becomes BN's non-zero constant, which padding distorts."""
    weights = {"w1": weight(4, 2, 1, 1), "s": np.ones(4, np.float32), "o": np.ones(4, np.float32),
               "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32), "w2": weight(3, 4, 3, 3)}
    model = make_model([node("Conv", ["x", "w1"], "c"), node("BatchNormalization", ["c", "s", "o", "m", "v"], "bn"),
                        node("Conv", ["bn", "w2"], "y", pads=[1] * 4)], {"x": [1, 2, 4, 4]}, ["y"], weights)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5))(model)
    assert result.stats["neurons_zeroed"] == 0 and result.stats["neurons_removable"] == 0
    assert not ZeroRows()(result.model).modified


def test_prune_neurons_zeroes_a_residual_channel_in_every_branch():
    weights = {"w0": weight(4, 2, 1, 1), "w1": weight(4, 4, 1, 1), "w2": weight(3, 4, 1, 1)}
    model = make_model([node("Conv", ["x", "w0"], "s"), node("Conv", ["s", "w1"], "b"), node("Add", ["s", "b"], "sum"),
                        node("Conv", ["sum", "w2"], "y")], {"x": [1, 2, 3, 3]}, ["y"], weights)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5))(model)
    dead0 = ~array(result.model, "w0").reshape(4, -1).any(axis=1)
    dead1 = ~array(result.model, "w1").reshape(4, -1).any(axis=1)
    assert dead0.sum() == 2 and (dead0 == dead1).all()
    _, stats = zero_rows_exact(result.model)
    assert stats["channels_removed"] == 2


def test_prune_neurons_exclude_keeps_a_layer_whole():
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, exclude=("h",)))(mlp(weight(8, 5), weight(3, 8)))
    assert result.stats == {"neurons_zeroed": 0, "neurons_removable": 0, "neuron_groups": 2,
                            "skipped_excluded": 1, "skipped_graph_output": 1, "unprunable_excluded": 8,
                            "unprunable_graph_output": 3}


@pytest.mark.parametrize(("asked", "size", "most", "step", "multiple", "expected"), [
    (3, 12, 11, 1, 8, 4),     # 12 - 4 = 8 kept
    (3, 12, 11, 1, 1, 3),     # no rounding
    (4, 16, 15, 1, 8, 0),     # 16 or 8 kept: 0 and 8 are as near, the smaller wins
    (6, 16, 15, 1, 8, 8),
    (3, 12, 3, 1, 8, None),   # 4 would be needed, only 3 removable
    (1, 6, 5, 1, 8, None),    # fewer channels than the multiple
    (6, 24, 23, 4, 8, 8),     # grouped Conv: counts in steps of 4
])
def test_rounded_count(asked, size, most, step, multiple, expected):
    assert rounded_count(asked, size, most, step, multiple) == expected


@pytest.mark.parametrize(("round_to", "zeroed"), [(1, 3), (8, 4)])
def test_prune_neurons_round_to_leaves_a_multiple(round_to, zeroed):
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25, round_to=round_to))(mlp(weight(12, 5), weight(3, 12)))
    assert result.stats["neurons_zeroed"] == zeroed and "groups_not_rounded" not in result.stats
    out, _ = zero_rows_exact(result.model)
    assert array(out, "w1").shape == (12 - zeroed, 5)


def test_prune_neurons_too_few_channels_to_round_prunes_as_asked():
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, round_to=8))(mlp(weight(6, 5), weight(3, 6)))
    assert result.stats["neurons_zeroed"] == 3 and result.stats["groups_not_rounded"] == 1


def test_prune_neurons_bad_options():
    with pytest.raises(InputError, match="round_to"):
        PruneNeurons.Options(round_to=0)
    with pytest.raises(InputError, match="ratio"):
        PruneNeurons.Options(ratio=1.0)
    with pytest.raises(InputError, match="method"):
        PruneNeurons.Options(method="magnitude")
    with pytest.raises(InputError, match="scope"):
        PruneNeurons.Options(scope="layer")
    with pytest.raises(InputError, match="calibration"):
        PruneNeurons(PruneNeurons.Options(method="wanda"))(mlp(weight(4, 3), weight(2, 4)))
    with pytest.raises(InputError, match="calibration"):
        PruneNeurons(PruneNeurons.Options(method="fluctuation"))(mlp(weight(4, 3), weight(2, 4)))


def calib_for(model: onnx.ModelProto, seed: int = 0, samples: int = 16, constant_first: bool = False) -> FeedSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 2, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
    if constant_first:
        x[..., 0] = 2.0
    return FeedSet({"x": x.astype(np.float32)}, "test")


def calib_outputs(model: onnx.ModelProto, calib: FeedSet) -> np.ndarray:
    return np.stack(run_model(model, calib)["y"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["wanda", "fluctuation"]), scope=st.sampled_from(["group", "global"]),
       ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 2**16))
def test_property_bias_correction_keeps_the_mean_output(method, scope, ratio, seed):
    """One hidden layer into a linear one: folding the zeroed neurons' means keeps the mean output exactly."""
    rng = np.random.default_rng(seed)
    model = mlp(rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32))
    calib = calib_for(model, seed)
    dense = calib_outputs(model, calib)  # before: passes rewrite the model in place
    result = PruneNeurons(PruneNeurons.Options(ratio=ratio, method=method, scope=scope, round_to=1),
                          PassContext(calib=calib))(model)
    assert result.stats["neurons_zeroed"] > 0 and result.stats["biases_corrected"] == 1
    pruned = calib_outputs(result.model, calib)
    np.testing.assert_allclose(pruned.mean(axis=(0, 1, 2)), dense.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-4 * np.abs(dense).max())
    zero_rows_exact(result.model)  # the corrected model still loses its zeroed neurons exactly


def test_without_bias_correction_the_mean_output_moves():
    model = mlp(weight(8, 5), weight(3, 8))
    calib = calib_for(model)
    dense = calib_outputs(model, calib)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, method="wanda", bias_correction=False, round_to=1),
                          PassContext(calib=calib))(model)
    assert "biases_corrected" not in result.stats and len(result.model.graph.node[-1].input) == 2  # no bias added
    pruned = calib_outputs(result.model, calib)
    assert np.abs(pruned.mean(axis=(0, 1, 2)) - dense.mean(axis=(0, 1, 2))).max() > 1e-2


def constant_neuron_mlp() -> onnx.ModelProto:
    """Hidden neurons 0 and 1 read only input 0, with the largest weights: constant when input 0 is.

    Its own seed: weights drawn from the shared generator depend on which tests ran before, and some
    draws leave the smaller neurons dead on the calibration data (pruning them changes nothing)."""
    local = np.random.default_rng(1)
    w1 = local.standard_normal((8, 5)).astype(np.float32)
    w1[:2] = 0
    w1[:2, 0] = 10.0
    return mlp(w1, local.standard_normal((3, 8)).astype(np.float32))


def test_fluctuation_prunes_neurons_that_never_vary_and_loses_nothing():
    model = constant_neuron_mlp()
    calib = calib_for(model, constant_first=True)
    dense = calib_outputs(model, calib)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25, method="fluctuation", round_to=1),
                          PassContext(calib=calib))(model)
    assert set(np.flatnonzero(~array(result.model, "w1").any(axis=1))) == {0, 1}
    np.testing.assert_allclose(calib_outputs(result.model, calib), dense, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["l2", "wanda"])
def test_magnitude_scores_keep_the_large_constant_neurons_and_lose_accuracy(method):
    model = constant_neuron_mlp()
    calib = calib_for(model, constant_first=True)
    dense = calib_outputs(model, calib)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25, method=method, round_to=1),
                          PassContext(calib=calib))(model)
    assert not {0, 1} & set(np.flatnonzero(~array(result.model, "w1").any(axis=1)))
    assert np.abs(calib_outputs(result.model, calib) - dense).max() > 1e-2


@pytest.mark.parametrize("options", [{"method": "wanda"}, {"method": "fluctuation", "scope": "global"},
                                     {"method": "l2", "scope": "global"}])
def test_prune_neurons_beside_a_subgraph_without_weights(options):
    """An If whose branches hold no weight: nothing to prune there, the top-level MLP still is."""
    branch = helper.make_graph([node("Identity", ["x"], "yb")], "b", [],
                               [helper.make_tensor_value_info("yb", TensorProto.FLOAT, [2, 5])])
    model = make_model([node("Gemm", ["x", "w1", "b1"], "h", transB=1), node("Relu", ["h"], "r"),
                        node("Gemm", ["r", "w2"], "y", transB=1),
                        node("If", ["cond"], "z", then_branch=branch, else_branch=branch)],
                       {"x": [2, 5]}, ["y", "z"], {"w1": weight(8, 5), "b1": weight(8), "w2": weight(3, 8),
                                                   "cond": np.array(True)})
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, round_to=1, **options),
                          PassContext(calib=calib_for(model)))(model)
    assert result.stats["neurons_zeroed"] == 4
    zero_rows_exact(result.model)


def test_prune_neurons_balances_grouped_conv_inputs():
    weights = {"w1": weight(8, 2, 1, 1), "g": weight(4, 2, 1, 1), "w3": weight(3, 4, 1, 1)}
    weights["w1"][:4] *= 0.01  # the weakest channels all sit in group 0 and 1 of the grouped Conv
    model = make_model([node("Conv", ["x", "w1"], "e"), node("Relu", ["e"], "r"),
                        node("Conv", ["r", "g"], "d", group=4), node("Conv", ["d", "w3"], "y")],
                       {"x": [1, 2, 4, 4]}, ["y"], weights)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.5, round_to=1))(model)
    dead = ~array(result.model, "w1").reshape(8, -1).any(axis=1)
    assert dead.reshape(4, 2).sum(axis=1).tolist() == [1, 1, 1, 1]
    _, stats = zero_rows_exact(result.model)
    assert stats["channels_removed"] == result.stats["neurons_zeroed"] == 4


# --------------------------------------------------------------------------- in place, on big external models


def test_pruned_weights_are_positive_zeros_and_the_input_file_is_untouched(tmp_path):
    """Zeroing clears the bits in place: a pruned negative weight is +0.0, not -0.0 (sparse files stay
    compressible), every survivor keeps its exact bits, and the external input is only read."""
    from onnxopt.modelio import load_model, save_model

    w1, w2 = weight(64, 32), weight(16, 64)
    path = tmp_path / "in.onnx"
    save_model(mlp(w1, w2), path, external=True)
    before = (tmp_path / "in.onnx.data").read_bytes()
    result = prune(load_model(path), sparsity=0.5)
    for name, original in (("w1", w1), ("w2", w2)):
        pruned = WeightStore(result.model.graph).array(name)
        zero = pruned == 0
        assert not np.signbit(pruned[zero]).any()
        np.testing.assert_array_equal(pruned[~zero], original[~zero])
        kth = np.sort(np.abs(original).ravel())[original.size // 2 - 1]
        assert (np.abs(original[zero]) <= kth).all() and zeros(pruned) == original.size // 2
    assert (tmp_path / "in.onnx.data").read_bytes() == before


def test_read_only_weights_are_pruned_into_a_new_array():
    from onnxopt.passes.prune import zero_where

    values = np.array([-1.0, 2.0, -3.0], np.float32)
    values.flags.writeable = False
    pruned = zero_where(values, np.array([True, False, True]))
    assert pruned is not values and pruned.tolist() == [0.0, 2.0, 0.0] and not np.signbit(pruned).any()
    writable = np.array([-1.0, 2.0], np.float32)
    assert zero_where(writable, np.array([True, False])) is writable and writable.tolist() == [0.0, 2.0]
