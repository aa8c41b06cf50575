"""Reconstruction statistics (XᵀX and XᵀY, layer by layer for SparseGPT and distill, one pass for GPTQ / learned
rounding) and the trials of accuracy-aware quantization through the executor seam, in this process: the results of the default
path, reruns bit-identical, merging in shard order whatever order the shards finish in.
(tests/test_ray.py compares the same on Ray workers.)"""

import functools
import random

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt import executor as executor_module
from onnxopt.data import FeedSet
from onnxopt.executor import InProcess
from onnxopt.passes.base import PassContext
from onnxopt.passes.distill import Distill
from onnxopt.passes.prune import Prune
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.quantize_weights import QuantizeWeights
from onnxopt.reconstruction import LayerGeometry, LayerStatistics
from onnxopt.reconstruction.stream import LayerwiseRunner, ShardedRunner, input_statistics

from conftest import make_model, tensor, value
from test_distill import data as distill_data
from test_distill import mlp as distill_mlp
from test_distill import residual_block
from test_sparsegpt import correlated_mlp

DISTILL_CALIB = distill_data(200, 1)


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 48)  # several shards of the test data


class Shuffled(InProcess):
    """Runs the shards in a random order (as Ray workers finish them), returns them in shard order."""

    def __init__(self, seed: int, workers: int = 1) -> None:
        super().__init__()
        self.rng, self.workers = random.Random(seed), workers

    def _map(self, fn, shards, shared, progress, pinned):
        order = list(range(len(shards)))
        self.rng.shuffle(order)
        results = [None] * len(shards)
        for i in order:
            results[i] = fn(self.cache, shards[i], *shared)
        return results


def scaled_feeds(count=200, span=1e3):
    """Samples whose scale grows along the data by ``span``: float sums then depend on the order they are added in."""
    model, calib, _ = correlated_mlp()
    x = np.asarray(calib.arrays["x"][:count]) * np.geomspace(1, span, count, dtype=np.float32)[:, None, None]
    return model, FeedSet({"x": x.astype(np.float32)}, "scaled")


def layer_sums(runner, geometry_of) -> list[LayerStatistics]:
    """Each layer's input statistics in order, with a change to each layer in between (as SparseGPT does)."""
    model = runner.model
    sums = []
    for node in [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]:
        weight = next(t for t in model.graph.initializer if t.name == node.input[1])
        sums.append(runner.statistics(node.input[0], geometry_of(weight), bias=True))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 0.5, weight.name))
        runner.changed(node)
    return sums


def test_layerwise_statistics_through_the_executor_see_earlier_changes_and_equal_the_default():
    model, feeds = scaled_feeds()

    def geometry(weight):  # fc1 is Gemm(transB): (out, in); the others (in, out)
        return LayerGeometry.linear(weight.dims[1] if weight.name == "w1" else weight.dims[0], 1)

    default = layer_sums(LayerwiseRunner(model.__deepcopy__(), feeds), geometry)
    with Shuffled(0) as executor:
        sharded_model = model.__deepcopy__()
        runner = ShardedRunner(executor, sharded_model, feeds)
        sharded = layer_sums(runner, geometry)
        runner.close()
        assert len(runner.shards) == 5 and executor.cache.state("other") == {}
    for a, b in zip(default, sharded):
        assert a.rows == b.rows == 200
        np.testing.assert_allclose(b.gram, a.gram, rtol=1e-5)  # later layers read the halved weights' outputs


def test_reruns_merge_in_shard_order_whatever_order_shards_finish_in(monkeypatch):
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 16)
    model, feeds = scaled_feeds(span=1e12)
    layers = {"x": LayerGeometry.linear(32, 1), "r1": LayerGeometry.linear(48, 1)}
    runs = [input_statistics(model, feeds, layers, executor=Shuffled(seed)) for seed in range(3)]
    for run in runs[1:]:
        for name in layers:
            np.testing.assert_array_equal(run[name].gram, runs[0][name].gram)
    # the test can fail: the same partials merged in another order give other bits
    from onnxopt.executor import split
    from onnxopt.reconstruction.stream import JOINED, _InputJob, _input_shard

    executor = InProcess()
    job = _InputJob(executor.put_model(model), layers, ("r1",), JOINED, True)
    partials = [_input_shard(executor.cache, shard, job)["r1"] for shard in split(feeds)]
    forward = functools.reduce(LayerStatistics.merge, partials).gram
    backward = functools.reduce(LayerStatistics.merge, partials[::-1]).gram
    np.testing.assert_array_equal(forward, runs[0]["r1"].gram)
    assert not np.array_equal(forward, backward)


def prune(model, calib, executor=None, **options):
    options = Prune.Options(sparsity=0.5, method="sparsegpt", **options)
    return Prune(options, PassContext(calib=calib, executor=executor))(model.__deepcopy__())


@pytest.mark.parametrize("dense_target", [True, False])
def test_sparsegpt_through_the_executor_prunes_like_the_default_and_reruns_bit_for_bit(dense_target):
    """Dense targets too: each shard's worker runs the unpruned model beside the pruned one. (The per-layer
    damping choice needs folds of the batches, which the shards' merged sums do not keep: it is skipped and
    counted there.)"""
    model, calib, _ = correlated_mlp()
    default = prune(model, calib, dense_target=dense_target, choose_damping=False)
    runs = [prune(model, calib, Shuffled(seed), dense_target=dense_target, choose_damping=False) for seed in range(2)]
    assert prune(model, calib, Shuffled(0), dense_target=dense_target).stats["damping_choice_skipped_executor"] == 3
    assert runs[0].stats == default.stats
    assert runs[0].model == runs[1].model
    for a, b in zip(default.model.graph.initializer, runs[0].model.graph.initializer):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        assert np.array_equal(x == 0, y == 0), a.name  # the same weights pruned
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5)


def test_dense_targets_change_the_sharded_result():
    """The twin: with and without dense targets the executor prunes differently (the option reaches it)."""
    model, calib, _ = correlated_mlp()
    with_dense, own = (prune(model, calib, Shuffled(0), dense_target=flag).model for flag in (True, False))
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(with_dense.graph.initializer, own.graph.initializer))


@pytest.mark.parametrize("options", [{"method": "gptq"}, {"rounding": "learned"}])
def test_gptq_and_learned_rounding_statistics_through_the_executor(options):
    model, calib, _ = correlated_mlp()

    def quantize(executor=None):
        pass_ = QuantizeWeights(QuantizeWeights.Options(bits=4, block_size=16, **options),
                                PassContext(calib=calib, executor=executor))
        return pass_(model.__deepcopy__())

    default, runs = quantize(), [quantize(Shuffled(seed)) for seed in range(2)]
    assert runs[0].model == runs[1].model
    assert runs[0].stats == default.stats
    codes = [t for t in default.model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert codes
    for a in codes:  # 4-bit codes from sums merged per shard: the default's, but for a rare rounding tie
        b = next(t for t in runs[0].model.graph.initializer if t.name == a.name)
        assert np.mean(numpy_helper.to_array(a) != numpy_helper.to_array(b)) < 0.01


def distilled(student, teacher, executor=None):
    return Distill(None, PassContext(calib=DISTILL_CALIB, teacher=lambda: teacher, executor=executor))(
        student.__deepcopy__())


@pytest.mark.parametrize("block", [distill_mlp, residual_block])
def test_distill_through_the_executor_refits_like_the_default_and_reruns_bit_for_bit(block):
    """Student and teacher runners per shard on the workers, XᵀX / XᵀY / Σ Y² and the exact error of the current
    weights summed there, the residual-stream targets and the output errors too."""
    teacher = block()
    student = Prune(Prune.Options(sparsity=0.75))(teacher.__deepcopy__()).model
    default = distilled(student, teacher)
    runs = [distilled(student, teacher, Shuffled(seed)) for seed in range(2)]
    assert runs[0].model == runs[1].model and runs[0].stats == runs[1].stats
    assert runs[0].stats.keys() == default.stats.keys()
    for key, value in default.stats.items():
        assert runs[0].stats[key] == pytest.approx(value, rel=1e-4), key
    assert default.stats["layers_refit"] >= 2
    for a, b in zip(default.model.graph.initializer, runs[0].model.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(b), numpy_helper.to_array(a), rtol=1e-3, atol=1e-5)


def sensitive_mlp(layers=5):
    """MatMul layers whose inputs carry outliers of growing size: per-tensor int8 hurts the later ones most."""
    rng = np.random.default_rng(0)
    nodes, inits, source = [], [], "x"
    for i in range(layers):
        scale = np.ones(16, np.float32)
        scale[[i, 9]] = 4.0 ** (i + 1)
        nodes += [helper.make_node("Mul", [source, f"s{i}"], [f"a{i}"], name=f"amplify{i}"),
                  helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"h{i}"], name=f"mm{i}")]
        inits += [tensor(f"s{i}", scale), tensor(f"w{i}", (rng.standard_normal((16, 16)) / scale[:, None] / 3
                                                           ).astype(np.float32))]
        source = f"h{i}"
    model = make_model(nodes, [value("x", ["batch", 8, 16])], [value(source, ["batch", 8, 16])], inits)
    feeds = FeedSet({"x": rng.standard_normal((40, 1, 8, 16)).astype(np.float32)}, "c")
    return model, feeds


def accuracy_aware(model, feeds, executor=None, **options):
    options = QuantizePass.Options(mode="static", method="minmax", min_cosine=0.9995, sensitivity_samples=40,
                                   **options)
    return QuantizePass(options, PassContext(calib=feeds, executor=executor))(model.__deepcopy__())


@pytest.mark.parametrize("workers", [1, 3])
def test_accuracy_aware_trials_through_the_executor_choose_what_the_default_chooses(workers):
    model, feeds = sensitive_mlp()
    default = accuracy_aware(model, feeds)
    kept = {k for k in default.stats if k.startswith("kept_float:")}
    assert 2 <= len(kept) < 5  # a few greedy steps: windows of trials are exercised
    sharded = accuracy_aware(model, feeds, Shuffled(0, workers))
    assert {k for k in sharded.stats if k.startswith("kept_float:")} == kept
    assert sharded.stats["calib_cosine"] == pytest.approx(default.stats["calib_cosine"], abs=1e-6)
    assert [r["cosine_alone"] for r in sharded.details["sensitivity"]] == pytest.approx(
        [r["cosine_alone"] for r in default.details["sensitivity"]], abs=1e-6)
    assert sharded.model == accuracy_aware(model, feeds, Shuffled(1, workers)).model


def test_what_a_restarted_worker_lost_stops_the_pass_with_one_clear_message():
    """``ShardRunners.held``: an earlier task's rows come back (and ``pop`` takes them); rows a restarted
    worker no longer holds raise the readable error, not a KeyError from deep inside a task."""
    from onnxopt.errors import OnnxoptError
    from onnxopt.reconstruction.stream import ShardRunners

    runners = ShardRunners(None, None, {"rows": (1, 2)})
    assert runners.held("rows") == (1, 2) and "rows" in runners.kept
    assert runners.held("rows", pop=True) == (1, 2) and "rows" not in runners.kept
    with pytest.raises(OnnxoptError, match="restarted .* lost its shard's 'rows'"):
        runners.held("rows")
