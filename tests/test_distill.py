"""distill: layer-wise repair of a pruned student against its dense teacher, on real onnxruntime runs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from conftest import make_model, tensor, value
from onnxopt.data import FeedSet
from onnxopt.errors import InputError
from onnxopt.passes.base import PassContext
from onnxopt.graph import GraphIndex, WeightStore, unique_name_factory
from onnxopt.passes import distill as distill_module
from onnxopt.passes.distill import Distill, Layer
from onnxopt.reconstruction import LayerGeometry, LayerStatistics
from onnxopt.reconstruction import stream as stream_module
from onnxopt.reconstruction.stream import LayerwiseRunner
from onnxopt.passes.prune import Prune
from onnxopt.passes.prune_neurons import PruneNeurons
from onnxopt.passes.weights import weight_use
from onnxopt.passes.zero_rows import ZeroRows
from onnxopt.validate import Session, run_model


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x[batch,16] -> Gemm(transB) 32 -> Relu -> MatMul+Add 24 -> Relu -> MatMul+Add 6 -> y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["h2"], name="bias2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["m3"], name="fc3"),
             helper.make_node("Add", ["b3", "m3"], ["y"], name="bias3")]
    inits = [tensor("w1", rng.standard_normal((32, 16)).astype(np.float32) / 4),
             tensor("b1", rng.standard_normal(32).astype(np.float32) / 4),
             tensor("w2", rng.standard_normal((32, 24)).astype(np.float32) / 6),
             tensor("b2", rng.standard_normal(24).astype(np.float32) / 4),
             tensor("w3", rng.standard_normal((24, 6)).astype(np.float32) / 5),
             tensor("b3", rng.standard_normal(6).astype(np.float32))]
    return make_model(nodes, [value("x", ["batch", 16])], [value("y", ["batch", 6])], inits)


def data(count: int, seed: int, shape=(1, 16)) -> FeedSet:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((count, *shape)) @ np.diag(np.linspace(0.3, 2.0, shape[-1]))  # uneven input scales
    return FeedSet({"x": mix.astype(np.float32)}, f"seed{seed}")


CALIB, HELD_OUT = data(256, 1), data(128, 2)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def distill(student, teacher, calib=CALIB, **options):
    return Distill(Distill.Options(**options), PassContext(calib=calib, teacher=lambda: teacher))(copy(student))


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def rel_err(student: onnx.ModelProto, teacher: onnx.ModelProto, feeds: FeedSet = HELD_OUT) -> float:
    s, t = (np.concatenate(run_model(m, feeds)["y"]) for m in (student, teacher))
    return float(np.linalg.norm(s - t) / np.linalg.norm(t))


# --------------------------------------------------------------------------- repairs


def test_pruned_student_gets_closer_on_held_out_data_and_keeps_every_zero():
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    result = distill(pruned, teacher)
    assert result.modified and result.stats["layers_refit"] == 3 and result.stats["layers_reverted"] == 0
    assert result.stats["calib_rel_err_after"] < 0.7 * result.stats["calib_rel_err_before"]
    assert rel_err(result.model, teacher) < 0.7 * rel_err(pruned, teacher)
    before, after = weights(pruned), weights(result.model)
    for name in ("w1", "w2", "w3"):
        assert ((after[name] == 0) == (before[name] == 0)).all()  # pruned zeros stay, no new ones
        assert not np.array_equal(after[name], before[name])


def test_without_keep_zeros_the_pruned_weights_come_back():
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    result = distill(pruned, teacher, keep_zeros=False)
    assert all(np.count_nonzero(weights(result.model)[n] == 0) == 0 for n in ("w1", "w2", "w3"))
    assert result.stats["layers_refit"] == 3


def test_removed_neurons_skip_their_layer_and_the_next_layer_is_refit():
    teacher = mlp()
    context = PassContext(calib=CALIB)
    zeroed = PruneNeurons(PruneNeurons.Options(ratio=0.5), context)(copy(teacher)).model
    slim = ZeroRows()(zeroed).model
    result = distill(slim, teacher)
    assert result.stats["skipped_width_mismatch"] == 2  # fc1 and fc2 lost outputs
    assert result.stats["layers_refit"] == 1
    assert not np.array_equal(weights(result.model)["w3"], weights(slim)["w3"])
    assert rel_err(result.model, teacher) < 0.7 * rel_err(slim, teacher)


def test_gemm_alpha_beta_and_trans_a_are_respected():
    rng = np.random.default_rng(6)
    teacher = make_model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
                         [value("x", [16, "batch"])], [value("y", ["batch", 6])],
                         [tensor("w", rng.standard_normal((16, 6)).astype(np.float32)),
                          tensor("c", rng.standard_normal((1, 6)).astype(np.float32))])
    mixing = rng.standard_normal((4, 16))  # correlated inputs: kept weights can stand in for pruned ones

    def feeds(count):
        x = rng.standard_normal((count, 1, 4)) @ mixing + 0.05 * rng.standard_normal((count, 1, 16))
        return FeedSet({"x": np.swapaxes(x, 1, 2).astype(np.float32)}, "correlated")

    calib, held_out = feeds(256), feeds(128)
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    result = distill(pruned, teacher, calib=calib, damping=1e-6)
    assert result.stats["layers_refit"] == 1
    assert rel_err(result.model, teacher, held_out) < 0.5 * rel_err(pruned, teacher, held_out)
    assert ((weights(result.model)["w"] == 0) == (weights(pruned)["w"] == 0)).all()


@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_weights_are_refit_zeros_kept_and_a_conv_without_bias_gets_one(group):
    """Plain, grouped and depthwise Convs: weights and biases refit through unfolded inputs."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "cw1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "cw2", "cb2"], ["c2"], pads=[1, 1, 1, 1], group=group, name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "cw3"], ["y"], strides=[2, 2], name="conv3")]
    teacher = make_model(nodes, [value("x", ["batch", 3, 8, 8])], [value("y", ["batch", 4, 3, 3])],
                         [tensor("cw1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 4),
                          tensor("cw2", rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32) / 6),
                          tensor("cb2", rng.standard_normal(8).astype(np.float32)),
                          tensor("cw3", rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 8)])
    images = (rng.standard_normal((96, 1, 3, 8, 8)) + 1).astype(np.float32)
    calib = FeedSet({"x": images[:64]}, "images")
    held_out = FeedSet({"x": images[64:]}, "held-out")
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    result = distill(pruned, teacher, calib=calib, damping=1e-3)
    assert result.stats["layers_refit"] == 3 and "reverted_whole" not in result.stats
    assert [len(n.input) for n in result.model.graph.node if n.op_type == "Conv"] == [3, 3, 3]
    before, after = weights(pruned), weights(result.model)
    for name in ("cw1", "cw2", "cw3"):
        assert ((after[name] == 0) == (before[name] == 0)).all() and not np.array_equal(after[name], before[name])
    assert result.stats["calib_rel_err_after"] < 0.7 * result.stats["calib_rel_err_before"]
    s, t, p = (np.concatenate(run_model(m, held_out)["y"]) for m in (result.model, teacher, pruned))
    assert np.linalg.norm(s - t) < 0.7 * np.linalg.norm(p - t)
    assert onnx.checker.check_model(result.model, full_check=True) is None


def test_a_repair_that_makes_the_output_worse_is_undone_whole():
    """Two errors that cancel: refitting fc1 alone (fc2, fc3 excluded) breaks the cancellation, so
    the output gets worse and the student comes back unchanged, bit for bit."""
    teacher = mlp()
    student = copy(teacher)
    w = weights(teacher)
    for init in student.graph.initializer:
        scale = {"w1": 2, "b1": 2, "w2": 0.5}.get(init.name)  # Relu(2h) = 2 Relu(h): cancelled by w2 / 2
        if scale is not None:
            init.CopyFrom(numpy_helper.from_array(w[init.name] * np.float32(scale), init.name))
    student.graph.initializer[-1].CopyFrom(numpy_helper.from_array(w["b3"] + np.float32(0.5), "b3"))
    result = distill(student, teacher, exclude=("fc2", "fc3"))
    assert result.stats["layers_refit"] == 1 and result.stats["reverted_whole"] == 1 and not result.modified
    assert result.stats["calib_rel_err_after"] == result.stats["calib_rel_err_before"]
    assert result.model.SerializeToString() == student.SerializeToString()
    fixed = distill(student, teacher)  # fc2 and fc3 may follow: the repair now pays
    assert "reverted_whole" not in fixed.stats
    assert fixed.stats["calib_rel_err_after"] < fixed.stats["calib_rel_err_before"]


# --------------------------------------------------------------------------- negative twin


def test_an_unchanged_student_is_left_exactly_as_it_is():
    teacher = mlp()
    result = distill(copy(teacher), teacher)
    assert not result.modified
    assert result.stats == {"layers_refit": 0, "layers_reverted": 0, "layers_matched": 3,
                            "calib_rel_err_before": 0.0, "calib_rel_err_after": 0.0,
                            "pieces_run": result.stats["pieces_run"]}
    assert result.model.SerializeToString() == teacher.SerializeToString()


# --------------------------------------------------------------------------- streaming


def test_batch_size_and_shards_do_not_change_the_result():
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    one = weights(distill(pruned, teacher, batch_size=1).model)
    four = weights(distill(pruned, teacher, batch_size=4).model)

    class Shards:
        """The same samples as two stored shards, one after the other (re-iterable)."""

        def __iter__(self):
            for part in (CALIB.arrays["x"][:100], CALIB.arrays["x"][100:]):
                yield from FeedSet({"x": part}, "shard")

    sharded = weights(distill(pruned, teacher, calib=Shards()).model)
    for name in one:
        np.testing.assert_allclose(four[name], one[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sharded[name], one[name], rtol=1e-4, atol=1e-6)


def test_small_matmul_pieces_run_without_graph_optimizations_and_distill_the_same_model(monkeypatch):
    """A small model's pieces skip onnxruntime's graph optimizations (their cost per session is most of a piece's
    run): the repaired model is the same to the byte as with every piece optimized."""
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    opened = []

    def recording(model, *args, optimize=False, **kwargs):
        opened.append(optimize)
        return Session(model, *args, optimize=optimize, **kwargs)

    monkeypatch.setattr(stream_module, "Session", recording)
    lean = distill(pruned, teacher).model
    assert opened and not any(opened)
    opened.clear()
    monkeypatch.setattr(stream_module, "OPTIMIZED_PIECE_BYTES", 0)  # every piece optimized
    optimized = distill(pruned, teacher).model
    assert opened and all(opened)
    assert lean.SerializeToString() == optimized.SerializeToString()


def test_conv_pieces_and_large_pieces_keep_graph_optimizations():
    rng = np.random.default_rng(4)

    def piece(op: str, shape: tuple[int, ...]) -> onnx.ModelProto:
        return make_model([helper.make_node(op, ["x", "w"], ["y"])], [value("x", [1, shape[1], 3, 3])],
                          [value("y", None)], [tensor("w", rng.standard_normal(shape).astype(np.float32))])

    assert not stream_module.graph_optimized(piece("MatMul", (16, 8)), {})
    assert stream_module.graph_optimized(piece("Conv", (4, 2, 1, 1)), {})  # NCHWc layouts, whatever the size
    assert stream_module.graph_optimized(piece("MatMul", (512, 256)), {})  # 512 KiB inside the piece
    assert stream_module.graph_optimized(piece("MatMul", (1, 1)), {"w": np.zeros((512, 256), np.float32)})


def test_undoing_a_conv_bias_leaves_no_trace_in_the_store():
    """A Conv without bias gets a new one; undoing it removes the initializer from graph and store alike."""
    rng = np.random.default_rng(3)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = make_model([conv], [value("x", [1, 2, 3, 3])], [value("y", [1, 4, 3, 3])],
                       [tensor("w", rng.standard_normal((4, 2, 1, 1)).astype(np.float32))])
    graph = model.graph
    store = WeightStore(graph)
    use = weight_use(graph.node[0], store)
    geometry = LayerGeometry.conv(conv, (4, 2, 1, 1))
    layer = Layer(store, use, "y", None, geometry, unique_name_factory(model))
    sums = LayerStatistics.empty(geometry, bias=True, target=True)
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    assert sums.update(geometry, x, np.ones((1, 4, 3, 3), np.float32))
    undo, row = layer.fit(sums, Distill.Options(keep_zeros=False))
    assert row["result"] == "refit" and row["rel_err_after"] < row["rel_err_before"]
    added = graph.node[0].input[2]
    assert added in store and store.array(added).shape == (4,)
    undo()
    assert list(graph.node[0].input) == ["x", "w"]
    assert [t.name for t in graph.initializer] == ["w"]
    assert added not in store and store.names() == ["w"]
    assert GraphIndex(graph).consumers.get(added) is None


# --------------------------------------------------------------------------- skips


def test_skip_reasons_are_counted_exactly():
    """Student vs teacher: a quantized weight, a narrower layer, a shared weight, a value the
    teacher lacks, and MatMuls inside If branches; only the layer after the narrow one is refit."""
    rng = np.random.default_rng(4)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) / 4

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "wt"], [f"{name}_out"])], name, [],
                                 [value(f"{name}_out", ["batch", 8])])

    def model(student: bool):
        nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"]),
                 helper.make_node("MatMul", ["x", "wb"], ["b"]),
                 helper.make_node("MatMul", ["b", "wbb"], ["bb"]),
                 helper.make_node("MatMul", ["x", "ws"], ["s1"]),
                 helper.make_node("MatMul", ["x", "ws" if student else "ws2"], ["s2"]),
                 helper.make_node("MatMul", ["x", "wn"], ["fresh" if student else "old"]),
                 helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
                 helper.make_node("If", ["cond"], ["i"], then_branch=branch("then"), else_branch=branch("else")),
                 helper.make_node("Sum", ["a", "bb", "s1", "s2", "fresh" if student else "old", "i"], ["y"])]
        inits = {"wa": wa, "wb": wb[:, :4] if student else wb, "wbb": wbb[:4] if student else wbb, "ws": ws,
                 "ws2": ws, "wn": wn, "wt": wt}
        if student:  # wa as int8 with a scale: MatMul reads DequantizeLinear
            nodes.insert(0, helper.make_node("DequantizeLinear", ["wa_q", "wa_scale"], ["wa"]))
            scale = np.float32(np.abs(wa).max() / 127)
            inits.pop("wa")
            inits.update(wa_q=np.round(wa / scale).astype(np.int8), wa_scale=scale)
            inits.pop("ws2")
        return make_model(nodes, [value("x", ["batch", 16])], [value("y", ["batch", 8])],
                          [tensor(k, v) for k, v in inits.items()])

    wa, wb, wbb, ws, wn, wt = w(16, 8), w(16, 8), w(8, 8), w(16, 8), w(16, 8), w(16, 8)
    teacher, student = model(False), model(True)
    result = distill(student, teacher)
    assert result.stats == {"layers_refit": 1, "layers_reverted": 0, "pieces_run": result.stats["pieces_run"],
                            "skipped_in_subgraph": 2, "skipped_quantized_weight": 1, "skipped_shared_weight": 2,
                            "skipped_missing_in_teacher": 1, "skipped_width_mismatch": 1,
                            "calib_rel_err_before": result.stats["calib_rel_err_before"],
                            "calib_rel_err_after": result.stats["calib_rel_err_after"]}
    assert result.stats["calib_rel_err_after"] < result.stats["calib_rel_err_before"]


def test_exclude_op_types_and_max_layers_limit_the_layers():
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    assert distill(pruned, teacher, exclude=("fc2",)).stats["skipped_excluded"] == 1
    assert distill(pruned, teacher, op_types=("Gemm",)).stats["layers_refit"] == 1
    limited = distill(pruned, teacher, max_layers=2)
    assert limited.stats["skipped_max_layers"] == 1 and limited.stats["layers_refit"] == 2
    assert np.array_equal(weights(limited.model)["w3"], weights(pruned)["w3"])


def test_layers_that_already_reproduce_the_teacher_are_left_alone():
    teacher = mlp()
    last_only = Prune(Prune.Options(sparsity=0.5, exclude=("fc1", "fc2")))(copy(teacher)).model
    result = distill(last_only, teacher)
    assert result.stats["layers_matched"] == 2 and result.stats["layers_refit"] == 1
    before, after = weights(last_only), weights(result.model)
    assert all(np.array_equal(after[n], before[n]) for n in ("w1", "b1", "w2", "b2"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, message", [
    ({"damping": 0.0}, "damping must be > 0"),
    ({"op_types": ("Conv", "LSTM")}, "op_types must be some of"),
    ({"op_types": ()}, "op_types must be some of"),
    ({"max_layers": -1}, "max_layers must be >= 0"),
    ({"batch_size": -1}, "batch_size must be >= 0"),
])
def test_bad_options_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        Distill.Options(**options)


def test_without_calibration_data_or_teacher_one_clear_error():
    teacher = mlp()
    with pytest.raises(InputError, match="distill needs calibration data"):
        Distill(None, PassContext(teacher=lambda: teacher))(copy(teacher))
    with pytest.raises(InputError, match="distill needs the original model"):
        Distill(None, PassContext(calib=CALIB))(copy(teacher))


# --------------------------------------------------------------------------- end to end


def test_optimize_reports_a_better_cosine_than_prune_alone(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    calib, held_out = {"x": CALIB.arrays["x"]}, {"x": HELD_OUT.arrays["x"]}
    alone = onnxopt.optimize(path, "prune(sparsity=0.6)", calib=calib, data=held_out, min_cosine=0).report
    repaired = onnxopt.optimize(path, "prune(sparsity=0.6),distill", calib=calib, data=held_out, min_cosine=0).report
    assert alone.passed and repaired.passed
    cosine = [r.steps[-1].vs_original["outputs"]["y"]["cosine"] for r in (alone, repaired)]
    assert cosine[1] > cosine[0] + 0.03
    assert repaired.steps[-1].stats["layers_refit"] == 3


# --------------------------------------------------------------------------- residual streams


def residual_block(broadcast: bool = False, seed: int = 4) -> onnx.ModelProto:
    """x[batch,16] -> fc_in 16 (h) -> Relu -> fc_out 16 -> Reshape -> Add(h) -> y: fc_out writes to h's stream.
    ``broadcast``: the Add's other input is a per-sample mean of h, (batch, 1), not a residual of y's shape
    (fc_out reads h less that mean, so the mean is known before fc_out is fit)."""
    rng = np.random.default_rng(seed)
    other = "hm" if broadcast else "h"
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["m_in"], name="fc_in"),
             helper.make_node("Add", ["m_in", "b_in"], ["h"], name="bias_in"),
             *([helper.make_node("ReduceMean", ["h"], ["hm"], axes=[1], keepdims=1),
                helper.make_node("Sub", ["h", "hm"], ["hc"])] if broadcast else []),
             helper.make_node("Relu", ["hc" if broadcast else "h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w_out", "b_out"], ["g"], name="fc_out"),
             helper.make_node("Reshape", ["g", "shape"], ["o"], name="reshape"),
             helper.make_node("Add", ["o", other], ["y"], name="residual")]
    inits = [tensor("w_in", rng.standard_normal((16, 16)).astype(np.float32) / 4),
             tensor("b_in", rng.standard_normal(16).astype(np.float32) / 4),
             tensor("w_out", rng.standard_normal((16, 16)).astype(np.float32) / 4),
             tensor("b_out", rng.standard_normal(16).astype(np.float32) / 4),
             tensor("shape", np.array([-1, 16], np.int64))]
    return make_model(nodes, [value("x", ["batch", 16])], [value("y", ["batch", 16])], inits, opset=17)


def test_a_layer_writing_to_a_residual_stream_also_repairs_the_stream(monkeypatch):
    """fc_out is fit to the teacher's sum minus the student's (still pruned) h: it makes up for fc_in's
    remaining error too, so the output gets closer than with fc_out's own output as the target."""
    import onnxopt.passes.distill as module

    teacher = residual_block()
    pruned = Prune(Prune.Options(sparsity=0.75))(copy(teacher)).model
    streamed = distill(pruned, teacher)
    assert streamed.stats["stream_targets"] == 1 and streamed.stats["layers_refit"] == 2
    monkeypatch.setattr(module, "_residual_stream", lambda *args, **kwargs: None)
    plain = distill(pruned, teacher)
    assert "stream_targets" not in plain.stats
    assert streamed.stats["calib_rel_err_after"] < 0.95 * plain.stats["calib_rel_err_after"]
    assert rel_err(streamed.model, teacher) < rel_err(plain.model, teacher)


def test_a_broadcast_residual_falls_back_to_the_layer_target_and_is_counted():
    teacher = residual_block(broadcast=True)
    pruned = Prune(Prune.Options(sparsity=0.75))(copy(teacher)).model
    result = distill(pruned, teacher)
    assert result.stats["stream_target_shape_mismatch"] == 1 and "stream_targets" not in result.stats
    assert result.stats["calib_rel_err_after"] < result.stats["calib_rel_err_before"]


def test_teacher_values_asked_ahead_are_held_once_and_equal_asking_one_by_one():
    """The teacher's values for later layers come in the same piece (one session) and stay until asked
    for; released ones are dropped; the values equal a run that asks one at a time."""
    model = mlp()
    one_by_one = LayerwiseRunner(model, CALIB)
    expected = {name: one_by_one.values([name])[name] for name in ("h1", "h2", "y")}
    assert one_by_one.sessions == 3
    runner = LayerwiseRunner(model, CALIB)
    h1 = runner.values(["h1"], ahead=["h2", "r2", "y"])["h1"]
    assert runner.sessions == 1 and runner.held == {"h2", "r2", "y"}
    for name, values in [("h1", h1), ("h2", runner.values(["h2"])["h2"]), ("y", runner.values(["y"])["y"])]:
        np.testing.assert_array_equal(np.concatenate(values), np.concatenate(expected[name]))
    assert runner.sessions == 1 and runner.held == {"r2"}
    runner.release(["r2"])
    assert not runner.held and "r2" not in runner.frontier


def test_distill_asks_the_teacher_for_later_layers_in_few_pieces():
    """Three layers, two teacher pieces (one piece per layer would be three)."""
    sessions = []
    original = LayerwiseRunner._run

    def counting(self, piece, asked):
        if piece:
            sessions.append(self.model)
        return original(self, piece, asked)

    teacher, student = mlp(), mlp()
    student.graph.initializer[2].CopyFrom(tensor("w2", np.where(np.arange(32 * 24).reshape(32, 24) % 2, 0,
                                                                weights(teacher)["w2"]).astype(np.float32)))
    LayerwiseRunner._run = counting
    try:
        result = Distill(None, PassContext(calib=CALIB, teacher=lambda: teacher))(student)
    finally:
        LayerwiseRunner._run = original
    assert result.stats["layers_refit"] >= 1
    # the first layer's target alone (no size known yet), then the two later layers' in one piece
    assert sum(1 for m in sessions if m is teacher) == 2


# --------------------------------------------------------------------------- the teacher and the outputs before, in threads


def test_plan_says_ahead_what_ready_will_say_after_the_same_asks():
    """What the teacher's thread decides for each layer (ask for the stream's sum or not) before the student
    has run anything equals what the student says when it gets there."""
    for model, asks, checks in [(residual_block(), ["x", "r", "r"], ["h", "h", "y"]),
                                (mlp(), ["x", "r1", "r2"], ["r1", "h1", None])]:
        planned = LayerwiseRunner(model, CALIB).plan(asks, checks)
        runner, seen = LayerwiseRunner(model, CALIB), []
        for ask, check in zip(asks, checks):
            runner.values([ask])
            seen.append(check is not None and runner.ready(check))
        assert planned == seen and True in seen and False in seen


def test_later_computes_the_values_of_the_model_as_it_was_when_asked():
    """The outputs before a change, computed in a thread after the change was made."""
    teacher = mlp()
    model = copy(teacher)
    compute = LayerwiseRunner(model, CALIB).later(["y"])
    model.graph.initializer[2].CopyFrom(tensor("w2", np.zeros((32, 24), np.float32)))
    with ThreadPoolExecutor(1) as pool:
        before = pool.submit(compute).result()["y"]
    np.testing.assert_array_equal(np.concatenate(before), np.concatenate(run_model(teacher, CALIB, optimize=True)["y"]))
    assert not np.array_equal(np.concatenate(before), np.concatenate(run_model(model, CALIB, optimize=True)["y"]))


@pytest.fixture
def threaded(monkeypatch):
    """Every model's teacher and unchanged student in threads, however small (``THREADED_TEACHER_WORK``)."""
    monkeypatch.setattr(distill_module, "THREADED_TEACHER_WORK", 0)


def test_the_teachers_values_from_its_thread_equal_asking_in_order(threaded):
    """Per layer, the values the thread queues are those the layer would ask for one at a time."""
    teacher = residual_block()
    student = Prune(Prune.Options(sparsity=0.75))(copy(teacher)).model
    stats: dict = {}
    layers = Distill(None, PassContext(calib=CALIB, teacher=lambda: teacher))._layers(student, teacher, stats)
    runs = distill_module._Runs(student, teacher, CALIB, 0, layers)
    try:
        direct = LayerwiseRunner(teacher, CALIB)
        for layer in layers:
            queued, asked = runs.taught().next(), direct.values(layer.rows.teacher_values)
            assert set(queued) == set(layer.rows.teacher_values)  # fc_out's stream sum too: h is known then
            for name in queued:
                np.testing.assert_array_equal(np.concatenate(queued[name]), np.concatenate(asked[name]))
        np.testing.assert_array_equal(np.concatenate(runs.taught().next()["y"]), np.concatenate(direct.values(["y"])["y"]))
    finally:
        runs.close()
    assert not _threads_left()


def _threads_left() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("distill-")]


@pytest.mark.parametrize("threshold", [0, distill_module.THREADED_TEACHER_WORK])  # in a thread; in this one
def test_an_error_in_the_teachers_thread_is_raised_by_distill_and_no_thread_is_left(monkeypatch, threshold):
    monkeypatch.setattr(distill_module, "THREADED_TEACHER_WORK", threshold)
    teacher = mlp()
    student = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model

    def failing(*args):
        raise InputError("onnxruntime failed to run the model: teacher")

    monkeypatch.setattr(distill_module, "_teacher_values", failing)
    with pytest.raises(InputError, match="teacher"):
        distill(student, teacher)
    assert not _threads_left()


def test_an_error_in_a_layer_stops_the_teachers_thread(monkeypatch, threaded):
    """The thread is waiting to queue later layers' values when the first layer's fit fails: closed, it ends."""
    teacher = mlp()
    student = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model

    def failing(self, sums, options):
        raise InputError("fit failed")

    monkeypatch.setattr(Layer, "fit", failing)
    with pytest.raises(InputError, match="fit failed"):
        distill(student, teacher)
    assert not _threads_left()


def test_small_models_start_no_thread_and_distill_to_the_same_bytes_as_with_threads(monkeypatch):
    """Below ``THREADED_TEACHER_WORK`` (the mlp: 1.5 k weights times 256 samples) the teacher and the unchanged
    student run in this thread when needed: no thread start-up or GIL hand-off to pay for work smaller than
    them; with the threshold at 0, the twin starts both threads. The same asks in the same order: the same bytes."""
    teacher = mlp()
    student = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    started: list[str] = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread.name), start(thread))[1])
    layers = Distill(None, PassContext(calib=CALIB, teacher=lambda: teacher))._layers(copy(student), teacher, {})
    assert 0 < distill_module._teacher_work(layers, LayerwiseRunner(student, CALIB).batches) \
        < distill_module.THREADED_TEACHER_WORK
    inline = distill(copy(student), teacher).model
    assert not [name for name in started if name.startswith("distill-")]
    monkeypatch.setattr(distill_module, "THREADED_TEACHER_WORK", 0)
    in_threads = distill(copy(student), teacher).model
    assert {name.split("_")[0] for name in started} >= {"distill-teacher", "distill-before"}
    assert inline.SerializeToString() == in_threads.SerializeToString() != student.SerializeToString()
    assert not _threads_left()


def test_bench_distill_runs_another_checkouts_distill_beside_this_one():
    """``bench_distill.py --baseline``: a checkout's onnxopt imported beside this one (here: this same
    checkout) distills the same pruned model to the same bytes, through its own classes."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from bench_distill import checkout, distill_seconds

    baseline = checkout(root)
    assert baseline[0] is not Distill and baseline[0].__module__ == "onnxopt_baseline.passes.distill"
    teacher = mlp()
    pruned = Prune(Prune.Options(sparsity=0.5))(copy(teacher)).model
    ours, *_ = distill_seconds(pruned, teacher, CALIB, 1)
    theirs, *_ = distill_seconds(pruned, teacher, CALIB, 1, baseline)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert ours.SerializeToString() != pruned.SerializeToString()


def test_pieces_hand_their_big_weights_to_onnxruntime_as_arrays_and_compute_the_same(monkeypatch):
    """Weights from IN_MEMORY_BYTES up reach onnxruntime as arrays beside the piece (not copied into it nor
    serialized); the values equal those of pieces that hold every weight inline, to the bit."""
    from onnxopt.reconstruction import stream

    model = mlp()
    inline = LayerwiseRunner(model, CALIB).values(["h2", "y"])
    monkeypatch.setattr(stream, "IN_MEMORY_BYTES", 1 << 10)  # w1 (2 KiB) and w2 (3 KiB); not w3 (576 B)
    runner = LayerwiseRunner(model, CALIB)
    sub, arrays, *_ = runner._prepare(runner._ancestors(["y"]), ["y"])
    assert set(arrays) == {"w1", "w2"}
    stubs = {t.name: t for t in sub.graph.initializer}
    assert all(not stubs[n].raw_data and stubs[n].data_location == onnx.TensorProto.EXTERNAL for n in arrays)
    assert stubs["w3"].raw_data and stubs["b1"].raw_data
    np.testing.assert_array_equal(arrays["w2"], weights(model)["w2"])
    handed = LayerwiseRunner(model, CALIB).values(["h2", "y"])
    for name in ("h2", "y"):
        np.testing.assert_array_equal(np.concatenate(handed[name]), np.concatenate(inline[name]))


def test_pieces_reading_external_data_keep_their_constants_as_they_are():
    from onnxopt.reconstruction.stream import _in_memory

    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    external = onnx.TensorProto(name="ext", data_type=onnx.TensorProto.FLOAT, dims=[64, 64],
                                data_location=onnx.TensorProto.EXTERNAL)
    external.external_data.add(key="location", value="weights.bin")
    assert _in_memory([big, external]) == ([big, external], {})
    kept, arrays = _in_memory([big])
    assert list(arrays) == ["big"] and not kept[0].raw_data


@pytest.mark.parametrize("big", [True, False])
def test_pieces_flush_subnormal_weights_and_compute_the_same(monkeypatch, big):
    """Subnormal weights reach onnxruntime as zeros (a microcode assist per multiply on x86), handed over
    as arrays (``big``) or inline; the model itself keeps them, and the values equal a plain run's."""
    from onnxopt.reconstruction import stream

    model = mlp()
    w2 = weights(model)["w2"].copy()
    w2[::3, ::2] = np.float32(1e-39) * np.sign(w2[::3, ::2])  # subnormal, both signs
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    monkeypatch.setattr(stream, "IN_MEMORY_BYTES", 1 << 10 if big else 1 << 20)
    runner = LayerwiseRunner(model, CALIB)
    sub, arrays, *_ = runner._prepare(runner._ancestors(["y"]), ["y"])
    handed = arrays["w2"] if big else numpy_helper.to_array(next(t for t in sub.graph.initializer if t.name == "w2"))
    tiny = np.abs(w2) < np.finfo(np.float32).tiny
    assert np.all(handed[tiny & (w2 != 0)] == 0) and np.array_equal(handed[~tiny], w2[~tiny])
    assert np.array_equal(np.signbit(handed), np.signbit(w2))
    np.testing.assert_array_equal(weights(model)["w2"], w2)  # the model is not changed
    plain = run_model(model, CALIB)["y"]
    np.testing.assert_array_equal(np.concatenate(LayerwiseRunner(model, CALIB).values(["y"])["y"]),
                                  np.concatenate(plain))
