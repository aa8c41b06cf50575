"""Attention-aware distill: query / key pairs refit to the teacher's scores in the softmax's Fisher metric."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import make_model, tensor, value
from onnxopt.data import FeedSet
from onnxopt.errors import InputError
from onnxopt import executor as executor_module
from onnxopt.executor import InProcess
from onnxopt.graph import ConstantResolver, GraphIndex, WeightStore
from onnxopt.passes.base import PassContext
from onnxopt.passes.distill import Distill
from onnxopt.passes.prune import Prune
from onnxopt.reconstruction import attention as attention_module
from onnxopt.reconstruction.attention import (ScoreProblem, conjugate_gradients, find_attention, fisher_weight,
                                             local_scores, masked_preconditioner)
from onnxopt.validate import run_model

LENGTH, WIDTH, HEADS, SIZE = 8, 16, 2, 8


def attention_block(style: str = "matmul", seed: int = 0) -> onnx.ModelProto:
    """One self-attention, two heads of 8, then an output projection.

    ``matmul``: x [batch, 8, 16], MatMul + Add projections, Reshape [0, 0, 2, 8], K laid out by one Transpose,
    scores times 1/√8 (``prescaled``: the query times 1/√8 before its Reshape instead). ``gemm`` (as PyTorch exports BERT): x [1, 8, 16] flattened for Gemm projections,
    Reshape [1, 8, -1, 8], K by two Transposes, scores divided by √8, plus an additive mask input."""
    rng = np.random.default_rng(seed)
    gemm = style == "gemm"
    w = {n: rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * (0.6 if n in "qk" else 0.3) for n in "qkvo"}
    b = {n: (0.1 * rng.standard_normal(WIDTH)).astype(np.float32) for n in "qkvo"}
    nodes, inits = [], [tensor(f"w{n}", w[n]) for n in "qkvo"] + [tensor(f"b{n}", b[n]) for n in "qkvo"]
    if gemm:
        nodes.append(helper.make_node("Reshape", ["x", "rows"], ["xr"]))
        for n in "qkv":
            nodes.append(helper.make_node("Gemm", ["xr", f"w{n}", f"b{n}"], [n], name=f"proj_{n}"))
        inits += [tensor("rows", np.array([-1, WIDTH], np.int64)), tensor("split", np.array([1, LENGTH, -1, SIZE]))]
    else:
        for n in "qkv":
            nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"m{n}"], name=f"proj_{n}"),
                      helper.make_node("Add", [f"m{n}", f"b{n}"], [n])]
        inits.append(tensor("split", np.array([0, 0, HEADS, SIZE], np.int64)))
    prescaled = style == "prescaled"
    if prescaled:
        nodes.append(helper.make_node("Mul", ["inverse_root", "q"], ["q_scaled"]))
    for n in "qkv":
        nodes.append(helper.make_node("Reshape", ["q_scaled" if prescaled and n == "q" else n, "split"], [f"{n}4"]))
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3])]
    if gemm:
        nodes += [helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["qh", "kt"], ["raw"]),
                  helper.make_node("Div", ["raw", "root"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "mask"], ["scores"])]
        inits.append(tensor("root", np.array(np.sqrt(SIZE), np.float32)))
    else:
        nodes += [helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
                  helper.make_node("MatMul", ["qh", "kt"], ["raw"])]
        nodes.append(helper.make_node("Identity", ["raw"], ["scores"]) if prescaled
                     else helper.make_node("Mul", ["raw", "inverse_root"], ["scores"]))
        inits.append(tensor("inverse_root", np.array(1 / np.sqrt(SIZE), np.float32)))
    nodes += [helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
              helper.make_node("MatMul", ["attn", "vh"], ["context"]),
              helper.make_node("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ct", "joined"], ["c"]),
              helper.make_node("MatMul", ["c", "wo"], ["mo"], name="proj_o"),
              helper.make_node("Add", ["mo", "bo"], ["y"])]
    inits.append(tensor("joined", np.array([-1, LENGTH, WIDTH], np.int64)))
    batch = 1 if gemm else "batch"
    inputs = [value("x", [batch, LENGTH, WIDTH])] + ([value("mask", [1, 1, 1, LENGTH])] if gemm else [])
    return make_model(nodes, inputs, [value("y", [batch, LENGTH, WIDTH])], inits)


def feeds(style: str, count: int, seed: int) -> FeedSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 1, LENGTH, WIDTH)) * np.linspace(0.5, 1.5, WIDTH)
    arrays = {"x": x.astype(np.float32)}
    if style == "gemm":  # the last 0-3 positions are padding
        lengths = rng.integers(LENGTH - 3, LENGTH + 1, count)
        arrays["mask"] = np.where(np.arange(LENGTH) < lengths[:, None], 0, -30).astype(np.float32).reshape(
            count, 1, 1, 1, LENGTH)
    return FeedSet(arrays, f"seed{seed}")


def distill(student, teacher, calib, **options):
    return Distill(Distill.Options(**options), PassContext(calib=calib, teacher=lambda: teacher))(
        student.__deepcopy__())


def probabilities(model: onnx.ModelProto, data: FeedSet) -> np.ndarray:
    """The attention probabilities of every sample (the Softmax output made a graph output)."""
    probed = model.__deepcopy__()
    probed.graph.output.append(onnx.ValueInfoProto(name="attn"))
    return np.concatenate(run_model(probed, data)["attn"]).astype(np.float64)


def attention_kl(student: onnx.ModelProto, teacher: onnx.ModelProto, data: FeedSet) -> float:
    """Mean KL divergence of the student's attention rows from the teacher's."""
    p, q = probabilities(teacher, data), probabilities(student, data)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=-1)))


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def found(model: onnx.ModelProto, projections: dict[str, int]):
    index = GraphIndex(model.graph)
    return find_attention(index, ConstantResolver(index, WeightStore(model.graph), 17), projections)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("style", ["matmul", "gemm", "prescaled"])
def test_the_attention_is_found_with_its_heads_and_scale(style):
    [attention] = found(attention_block(style), {"q": WIDTH, "k": WIDTH, "v": WIDTH})
    assert (attention.query, attention.key, attention.scores, attention.probabilities) == ("q", "k", "raw", "attn")
    scale = np.float32(1 / np.sqrt(SIZE)) if style == "prescaled" else 1.0  # what lies between Q·Kᵀ and the MatMul
    assert (attention.heads, attention.head_size, attention.scale) == (HEADS, SIZE, scale)


def with_node_replaced(model: onnx.ModelProto, output: str, node: onnx.NodeProto, *extra) -> onnx.ModelProto:
    changed = model.__deepcopy__()
    position = next(i for i, n in enumerate(changed.graph.node) if output in n.output)
    changed.graph.node[position].CopyFrom(node)
    changed.graph.initializer.extend(extra)
    return changed


@pytest.mark.parametrize("change", ["softmax_axis", "per_channel_scale", "key_not_transposed", "query_read_twice"])
def test_what_is_not_query_key_attention_is_not_found(change):
    """Twins of the matmul block that break one condition each: nothing is found."""
    model, projections = attention_block(), {"q": WIDTH, "k": WIDTH}
    if change == "softmax_axis":
        model = with_node_replaced(model, "attn", helper.make_node("Softmax", ["scores"], ["attn"], axis=2))
    elif change == "per_channel_scale":  # a scale per key channel is no scalar: K's heads are not X W any more
        model = with_node_replaced(model, "k", helper.make_node("Mul", ["mk", "bk"], ["k"]))
        projections = {"q": WIDTH, "mk": WIDTH}  # distill's layer: the MatMul, with no bias after it
    elif change == "key_not_transposed":
        model = with_node_replaced(model, "kt", helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]))
    else:
        model.graph.output.append(value("q", ["batch", LENGTH, WIDTH]))
    assert found(model, projections) == []
    assert len(found(attention_block(), {"q": WIDTH, "k": WIDTH})) == 1


# --------------------------------------------------------------------------- the solver


def problem(seed: int, key: bool, sequences=5, heads=2, length=4, size=3, inputs=6) -> ScoreProblem:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((sequences, heads, length, length)) * 2
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return ScoreProblem(rng.standard_normal((sequences * length, inputs)).astype(np.float32),
                        rng.standard_normal((sequences, heads, length, size)).astype(np.float32),
                        rng.standard_normal((sequences, heads, length, length)).astype(np.float32),
                        p.astype(np.float32), key)


@pytest.mark.parametrize("key", [True, False])
def test_conjugate_gradients_reach_the_normal_equations_solution_and_keep_zeros(key):
    """The fit equals the minimiser of the Fisher-weighted score error over the kept weights, found by a
    dense solve of the normal equations built column by column from the same operator."""
    task = problem(1, key)
    rng = np.random.default_rng(2)
    start = rng.standard_normal((6, 6))
    keep = rng.random((6, 6)) < 0.6
    start[~keep] = 0
    fitted = task.fit(start, keep, steps=200, tolerance=0)
    assert np.all(fitted[~keep] == 0)
    free = np.flatnonzero(keep)

    unit = np.zeros(36)
    columns = []
    for i in free:  # the normal equations' matrix, one column per kept weight
        unit[:] = 0
        unit[i] = 1
        columns.append(task.product(unit.reshape(6, 6)).reshape(-1)[free])
    hessian = np.stack(columns, axis=1)
    rhs = task.residual(np.zeros((6, 6)))[0].reshape(-1)[free]
    exact = np.zeros(36)
    exact[free] = np.linalg.lstsq(hessian, rhs, rcond=None)[0]
    assert task.error(fitted) <= task.error(exact.reshape(6, 6)) * (1 + 1e-4) + 1e-6
    assert task.error(fitted) < 0.5 * task.error(start)


def test_chunks_of_sequences_give_the_same_fit(monkeypatch):
    task, keep = problem(3, True), np.random.default_rng(4).random((6, 6)) < 0.7
    start = np.where(keep, np.random.default_rng(5).standard_normal((6, 6)), 0)
    whole = task.fit(start, keep, 5)
    monkeypatch.setattr(attention_module, "CHUNK_BYTES", 1)  # one sequence at a time
    assert len(task.parts()) == 5
    np.testing.assert_allclose(task.fit(start, keep, 5), whole, rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 6), key=st.booleans())
def test_every_step_count_lowers_the_error_from_any_start(seed, steps, key):
    task = problem(seed, key)
    start = np.random.default_rng(seed + 1).standard_normal((6, 6))
    keep = np.random.default_rng(seed + 2).random((6, 6)) < 0.5
    assert task.error(task.fit(start, keep, steps)) <= task.error(start) * (1 + 1e-5)


def test_the_solver_tracks_the_error_it_reaches_and_stops_when_a_step_gains_little():
    task = problem(6, False)
    rng = np.random.default_rng(7)
    keep = rng.random((6, 6)) < 0.6
    start = np.where(keep, rng.standard_normal((6, 6)), 0)
    solved = conjugate_gradients(task, start, keep, 4, tolerance=0)
    assert solved.error_before == pytest.approx(task.error(start), rel=1e-5)
    assert solved.error_after == pytest.approx(task.error(solved.weights), rel=1e-4)
    first = conjugate_gradients(task, start, keep, 1, tolerance=0)
    stopped = conjugate_gradients(task, start, keep, 4, tolerance=1.5)  # the second step cannot gain 1.5x the first
    np.testing.assert_array_equal(stopped.weights, first.weights)
    assert solved.error_after < first.error_after


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_preconditioner_solves_the_kronecker_system_over_the_kept_weights(seed):
    """``mask ⊙ (G Z Qₕ) = R`` per head, with Z zero outside the mask (each factor damped as the solver does)."""
    rng = np.random.default_rng(seed)
    inputs, heads, size = 7, 2, 3
    a, b = rng.standard_normal((20, inputs)), rng.standard_normal((heads, 10, size))
    left, right = a.T @ a, np.einsum("hrd,hre->hde", b, b)
    keep = rng.random((inputs, heads * size)) < 0.6
    residual = np.where(keep, rng.standard_normal(keep.shape), 0)
    solved = masked_preconditioner((left, right), keep, iterations=200)(residual)
    assert np.all(solved[~keep] == 0)
    damp = attention_module.PRECONDITIONER_DAMPING
    left = left + damp * np.mean(np.diag(left)) * np.eye(inputs)
    right = right + damp * np.mean(np.diagonal(right, axis1=1, axis2=2), axis=1)[:, None, None] * np.eye(size)
    applied = np.concatenate([left @ solved[:, h * size:(h + 1) * size] @ right[h] for h in range(heads)], axis=1)
    np.testing.assert_allclose(np.where(keep, applied, 0), residual, atol=2e-3 * np.abs(residual).max())


def test_hidden_keys_leave_the_key_side_and_change_nothing(monkeypatch):
    """Key positions no query attends to (padding behind an additive mask) weigh nothing: the key side drops
    their rows, and the fit is the one over every row."""
    rng = np.random.default_rng(8)
    sequences, heads, length, size, inputs = 4, 2, 5, 3, 6
    logits = rng.standard_normal((sequences, heads, length, length))
    logits[:, :, :, 3:] -= 40  # the last two positions are padding
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    target = rng.standard_normal(p.shape).astype(np.float32)
    rows = tuple(rng.standard_normal((sequences * length, inputs)).astype(np.float32) for _ in range(2))
    attention = attention_module.AttentionScores("q", "k", "s", "p", heads, size, 0.5)
    weights = rng.standard_normal((inputs, heads * size))
    keep = rng.random(weights.shape) < 0.5
    start = np.where(keep, rng.standard_normal(weights.shape), 0)
    compact = local_scores(attention, rows, target, p.astype(np.float32))(True, weights)
    assert len(compact.inputs) == sequences * 3
    monkeypatch.setattr(attention_module, "HIDDEN", -1.0)  # every position visible
    whole = local_scores(attention, rows, target, p.astype(np.float32))(True, weights)
    assert len(whole.inputs) == sequences * length
    assert compact.error(start) == pytest.approx(whole.error(start), rel=1e-5)
    np.testing.assert_allclose(compact.product(start), whole.product(start), rtol=1e-4, atol=1e-4)
    fitted = compact.fit(start, keep, 200, 0)
    assert whole.error(fitted) <= whole.error(whole.fit(start, keep, 200, 0)) * (1 + 1e-4) + 1e-6


def test_fisher_weight_ignores_a_shift_of_a_row_and_masked_positions():
    rng = np.random.default_rng(0)
    errors = rng.standard_normal((3, 5))
    p = np.array([[0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.2, 0.2, 0.2], [1, 0, 0, 0, 0]])
    shifted = errors + rng.standard_normal((3, 1))
    np.testing.assert_allclose(fisher_weight(errors, p), fisher_weight(shifted, p), atol=1e-12)
    masked = errors.copy()
    masked[0, 2:] = 100
    np.testing.assert_allclose(fisher_weight(errors, p)[0], fisher_weight(masked, p)[0], atol=1e-12)
    assert np.allclose(fisher_weight(errors, p)[2], 0)  # a one-hot row has no sensitivity


# --------------------------------------------------------------------------- distill


@pytest.mark.parametrize("style", ["matmul", "gemm", "prescaled"])
@pytest.mark.parametrize("attention", [True, False])
def test_distill_lowers_the_attention_error_on_held_out_data_only_with_the_attention_fit(style, attention):
    """Pruned at 50 %, distill with the attention fit brings the attention rows closer to the teacher's on data
    it never saw than the per-layer fit alone; its twin (attention=false) does not refit and stays behind."""
    teacher = attention_block(style)
    calib, held_out = feeds(style, 96, 1), feeds(style, 64, 2)
    pruned = Prune(Prune.Options(sparsity=0.5))(teacher.__deepcopy__()).model
    plain = distill(pruned, teacher, calib, attention=False)
    result = distill(pruned, teacher, calib, attention=attention) if attention else plain
    assert ("attention_refit" in result.stats) == attention
    lowered = attention_kl(result.model, teacher, held_out) < 0.8 * attention_kl(plain.model, teacher, held_out)
    assert lowered == attention
    before, after = arrays(pruned), arrays(result.model)
    for name in ("wq", "wk"):
        assert np.array_equal(after[name] == 0, before[name] == 0)  # every pruned zero stays
    if attention:
        [row] = [r for r in result.details["layers"] if r["op"] == "Attention"]
        assert row["result"] == "refit" and row["rel_err_after"] < row["rel_err_before"]
        assert result.stats["calib_rel_err_after"] < plain.stats["calib_rel_err_after"]
        np.testing.assert_array_equal(after["bk"], arrays(plain.model)["bk"])  # the softmax ignores a key bias


@pytest.mark.parametrize("style", ["matmul", "gemm"])
def test_under_an_executor_the_attention_fit_gives_the_same_model(style, monkeypatch):
    """Each calibration shard's rows stay on its worker; every conjugate-gradient product is summed over the
    shards in order: the same weights as in this process."""
    teacher = attention_block(style)
    calib = feeds(style, 48, 1)
    pruned = Prune(Prune.Options(sparsity=0.5))(teacher.__deepcopy__()).model
    here = distill(pruned, teacher, calib)
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 20)  # three shards: 20, 20, 8
    sharded = Distill(None, PassContext(calib=calib, teacher=lambda: teacher, executor=InProcess()))(
        pruned.__deepcopy__())
    assert sharded.stats["attention_refit"] == here.stats["attention_refit"] == 1
    for name, array in arrays(here.model).items():
        np.testing.assert_allclose(arrays(sharded.model)[name], array, rtol=2e-3, atol=2e-5)
    assert attention_kl(sharded.model, teacher, feeds(style, 32, 2)) == pytest.approx(
        attention_kl(here.model, teacher, feeds(style, 32, 2)), rel=1e-3)


def test_bad_attention_steps_is_an_input_error():
    with pytest.raises(InputError, match="attention_steps must be >= 1"):
        Distill.Options(attention_steps=0)


def test_progress_prints_the_attention_fit_after_its_layer(capsys):
    teacher = attention_block()
    pruned = Prune(Prune.Options(sparsity=0.5))(teacher.__deepcopy__()).model
    Distill(None, PassContext(calib=feeds("matmul", 32, 1), teacher=lambda: teacher, progress=True))(pruned)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].split()[-1] for line in lines] == ["proj_q", "proj_k", "raw", "proj_v", "proj_o"]
    assert "attention raw: refit" in lines[2]
