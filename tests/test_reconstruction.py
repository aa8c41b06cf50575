"""The reconstruction engine: layer statistics (MatMul rows, unfolded Conv patches) and the OBS / ridge solvers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper

from conftest import make_model, tensor, value
from onnxopt.reconstruction import (LayerGeometry, LayerStatistics, SolverError, damped_inverse_cholesky, gptq,
                                    masked_refit, sparsegpt)
from onnxopt.validate import Session


def correlated(rows: int, inputs: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, inputs)) + 0.1 * rng.standard_normal((rows, inputs))


def minmax_grid(maxq: int):
    def choose(rows: np.ndarray):
        low, high = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
        scale = (high - low) / maxq
        return scale, np.rint(-low / np.where(scale == 0, 1, scale))
    return choose


def layer_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ w - x @ approx) / np.linalg.norm(x @ w))


def dequantize(codes, scales, zero_points, group):
    return (codes - np.repeat(zero_points, group, axis=0)) * np.repeat(scales, group, axis=0)


# --------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("group", [16, 64])
def test_gptq_layer_error_is_below_round_to_nearest_on_correlated_inputs(group):
    x = correlated(1024, 64, 12)
    w = np.random.default_rng(1).standard_normal((64, 24))
    choose = minmax_grid(15)
    codes, scales, zero_points, used = gptq(w, x.T @ x, maxq=15, group_size=group, choose_grid=choose)
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() <= 15
    assert scales.shape == zero_points.shape == (64 // group, 24) and used == 0.01
    nearest = np.concatenate([dequantize(np.clip(np.rint(b / s) + z, 0, 15), s[None], z[None], 1)
                              for b in np.split(w, 64 // group) for s, z in [choose(b)]])
    assert layer_error(x, w, dequantize(codes, scales, zero_points, group)) < 0.6 * layer_error(x, w, nearest)


def test_gptq_on_uncorrelated_identity_statistics_is_round_to_nearest():
    """No correlation to exploit: every row's error stays its own (the negative twin)."""
    w = np.random.default_rng(2).standard_normal((32, 8))
    choose = minmax_grid(7)
    codes, scales, zero_points, _ = gptq(w, np.eye(32), maxq=7, group_size=32, choose_grid=choose)
    s, z = choose(w)
    assert np.array_equal(codes, np.clip(np.rint(w / s) + z, 0, 7))


def test_gptq_act_order_visits_outlier_inputs_first_and_wins_on_held_out_rows():
    """Eight inputs 20x louder than the rest, last in input order: in that order GPTQ rounds them last, with
    nothing left to compensate their error; by descending diag(XᵀX) they go first."""
    rng = np.random.default_rng(0)
    mix, loud = rng.standard_normal((16, 128)), np.r_[np.ones(120), np.full(8, 20.0)]

    def rows(count: int) -> np.ndarray:
        return (rng.standard_normal((count, 16)) @ mix + 0.3 * rng.standard_normal((count, 128))) * loud

    x, held_out, w = rows(1024), rows(4096), rng.standard_normal((128, 32))
    errors = []
    for act_order in (False, True):
        codes, scales, zero_points, _ = gptq(w, x.T @ x, maxq=15, group_size=32, choose_grid=minmax_grid(15),
                                             act_order=act_order)
        errors.append(layer_error(held_out, w, dequantize(codes, scales, zero_points, 32)))
    assert errors[1] < 0.3 * errors[0], errors


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 999), groups=st.integers(1, 4))
def test_gptq_act_order_on_diagonal_statistics_is_round_to_nearest_on_the_static_grid(seed, groups):
    """Without correlation nothing is compensated, whatever the order: act_order's codes are each group's own
    round-to-nearest on the grid chosen from the weights as given (its static groups), in the input order."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16 * groups, 8))
    hessian = np.diag(rng.uniform(0.1, 10, 16 * groups))  # visiting order: a random permutation
    choose = minmax_grid(15)
    codes, scales, zero_points, _ = gptq(w, hessian, maxq=15, group_size=16, choose_grid=choose, act_order=True)
    for g, block in enumerate(np.split(w, groups)):
        s, z = choose(block)
        np.testing.assert_array_equal(scales[g], s)
        np.testing.assert_array_equal(codes[16 * g: 16 * (g + 1)], np.clip(np.rint(block / s) + z, 0, 15))


def test_gptq_rejects_a_group_size_that_does_not_divide_the_inputs():
    with pytest.raises(SolverError, match="group_size 5 must divide the 32 inputs"):
        gptq(np.zeros((32, 4)), np.eye(32), maxq=15, group_size=5, choose_grid=minmax_grid(15))


def test_singular_statistics_raise_the_damping_and_report_it():
    x = correlated(64, 16, 3)
    gram = x.T @ x
    gram[:, 0] = gram[0, :] = 0  # an input that is always zero: rank deficient, no damping can be zero
    upper, used = damped_inverse_cholesky(gram, 0.0)
    assert used > 0 and np.all(np.isfinite(upper))
    _, used_given = damped_inverse_cholesky(gram, 0.05)
    assert used_given == 0.05


# --------------------------------------------------------------------------- SparseGPT


def test_sparsegpt_error_is_below_magnitude_and_wanda_at_equal_sparsity():
    x = correlated(2048, 128, 24)
    w = np.random.default_rng(3).standard_normal((128, 48))
    pruned, _ = sparsegpt(w, x.T @ x, sparsity=0.5)
    assert np.count_nonzero(pruned == 0) == w.size // 2
    magnitude = np.where(np.abs(w) >= np.median(np.abs(w)), w, 0)
    score = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
    wanda = np.where(score >= np.median(score, axis=0), w, 0)  # per output, as in the paper
    assert layer_error(x, w, pruned) < 0.5 * min(layer_error(x, w, magnitude), layer_error(x, w, wanda))


@pytest.mark.parametrize("seed", range(3))
def test_adaptive_mask_blocks_beat_one_mask_for_the_whole_layer(seed):
    """A 64-input layer is one 128-row block: the mask would be fixed before any compensation; choosing it
    every 4 rows from the updated weights (budgets from the layer-wide ranking) errs several times less."""
    x = correlated(1024, 64, 16, seed)
    w = np.random.default_rng(seed + 10).standard_normal((64, 32))
    adaptive, _ = sparsegpt(w, x.T @ x, sparsity=0.5)
    whole, _ = sparsegpt(w, x.T @ x, sparsity=0.5, mask_block=128)
    assert np.count_nonzero(adaptive == 0) == np.count_nonzero(whole == 0) == w.size // 2
    assert layer_error(x, w, adaptive) < 0.5 * layer_error(x, w, whole)
    per_input = np.count_nonzero(adaptive == 0, axis=1)
    assert per_input.min() < 16 < per_input.max()  # the ranking spreads the zeros unevenly over the inputs


def test_sparsegpt_n_m_keeps_n_of_every_m_inputs_and_existing_zeros():
    x = correlated(512, 32, 8)
    w = np.random.default_rng(4).standard_normal((32, 8))
    w[5, 3] = 0
    pruned, _ = sparsegpt(w, x.T @ x, n_m=(2, 4))
    assert (np.count_nonzero(pruned.reshape(8, 4, 8), axis=1) == 2).all() and pruned[5, 3] == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.floats(0.0, 0.95), st.integers(0, 2**16))
def test_sparsegpt_meets_the_exact_target_and_keeps_zeros(blocks, sparsity, seed):
    rng = np.random.default_rng(seed)
    k = 8 * blocks
    w = rng.standard_normal((k, 5))
    w[rng.random(w.shape) < 0.2] = 0
    x = correlated(64, k, 4, seed)
    pruned, _ = sparsegpt(w, x.T @ x, sparsity=sparsity, block=8)
    target = int(np.floor(sparsity * w.size + 0.5))
    assert np.count_nonzero(pruned == 0) == max(target, np.count_nonzero(w == 0)) or \
        np.count_nonzero(pruned == 0) >= target  # zeros in one block can exceed its share
    assert (pruned[w == 0] == 0).all()


# --------------------------------------------------------------------------- masked ridge refit


def test_masked_refit_equals_one_solve_per_column():
    x = correlated(512, 48, 10)
    rng = np.random.default_rng(5)
    y = x @ rng.standard_normal((48, 12))
    start = rng.standard_normal((48, 12))
    keep = rng.random((48, 12)) < 0.5
    keep[:, 3] = False  # a pruned neuron stays as it is
    gram, cross = x.T @ x, x.T @ y
    fitted, _ = masked_refit(gram, cross, start * keep, keep, 1e-3, tolerance=1e-14, max_iterations=500)
    lam = 1e-3 * np.mean(np.diag(gram))

    def objective(w):
        return np.sum((x @ w - y) ** 2) + lam * np.sum((w - start * keep) ** 2)

    exact = np.zeros_like(fitted)
    for j in range(12):
        rows = np.flatnonzero(keep[:, j])
        if rows.size:
            exact[rows, j] = np.linalg.solve(gram[np.ix_(rows, rows)] + lam * np.eye(rows.size),
                                             cross[rows, j] + lam * start[rows, j])
    exact[:, 3] = (start * keep)[:, 3]
    np.testing.assert_allclose(fitted, exact, rtol=1e-2, atol=1e-3)  # float32 products in the iteration
    assert objective(exact) <= objective(fitted) <= objective(exact) * (1 + 1e-6)
    assert (fitted[~keep] == 0).all()


# --------------------------------------------------------------------------- statistics


def conv_case(group: int, **attrs):
    rng = np.random.default_rng(group)
    channels, out = 4 * group if group > 1 else 6, 2 * group if group > 1 else 5
    w = rng.standard_normal((out, channels // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    model = make_model([node], [value("x", ["batch", channels, 9, 11])], [value("y", None)], [tensor("w", w)])
    x = rng.standard_normal((3, channels, 9, 11)).astype(np.float32)
    with Session(model) as session:
        y = session.run({"x": x})["y"]
    return node, w, x, y


@pytest.mark.parametrize("group,attrs", [
    (1, {"pads": [1, 0, 1, 2], "strides": [2, 1]}),
    (1, {"dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    (1, {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),
    (2, {"strides": [1, 2]}),
    (4, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),  # depthwise with a channel multiplier of 2
])
@pytest.mark.parametrize("chunk_bytes", [32 << 20, 4096, 64])  # whole batch, a few lines, one line a chunk
def test_conv_rows_times_the_group_weight_reproduce_onnxruntime(group, attrs, chunk_bytes, monkeypatch):
    monkeypatch.setattr("onnxopt.reconstruction.statistics.CHUNK_BYTES", chunk_bytes)
    node, w, x, y = conv_case(group, **attrs)
    geometry = LayerGeometry.conv(node, w.shape)
    canonical = np.moveaxis(w, 1, -1)  # (out, kh, kw, in)
    per_group = canonical.reshape(group, w.shape[0] // group, -1)  # (G, out/G, K)
    rows = np.swapaxes(np.concatenate(list(geometry.columns(x)), axis=2), 1, 2)
    targets = np.concatenate(list(geometry.targets(y)), axis=1)
    np.testing.assert_allclose(rows @ np.swapaxes(per_group, 1, 2), targets, rtol=1e-4, atol=1e-4)
    assert geometry.input_rows(x) == rows.shape[1] == geometry.output_rows(y)


def unfolded_statistics(geometry: LayerGeometry, x: np.ndarray, y: np.ndarray) -> tuple:
    """The reference: gram, cross and Σ y² in float64 from the unfolded rows (im2col) and a ones column."""
    gram = cross = 0.0
    for at, t in zip(geometry.columns(x), geometry.targets(y)):
        a = np.concatenate([at.astype(np.float64), np.ones((at.shape[0], 1, at.shape[2]))], axis=1)
        gram = gram + a @ np.swapaxes(a, 1, 2)
        cross = cross + a @ t.astype(np.float64)
    return gram, cross, float(np.sum(np.asarray(y, np.float64) ** 2))


def assert_statistics_match(geometry: LayerGeometry, x: np.ndarray, y: np.ndarray) -> None:
    gram, cross, square = unfolded_statistics(geometry, x, y)
    sums = LayerStatistics.empty(geometry, bias=True, target=True)
    assert sums.update(geometry, x, y)
    np.testing.assert_allclose(sums.gram, gram, rtol=1e-5, atol=1e-5 * np.abs(gram).max())
    np.testing.assert_allclose(sums.cross, cross, rtol=1e-5, atol=1e-5 * np.abs(cross).max())
    assert sums.target_sq == pytest.approx(square, rel=1e-5)
    assert sums.rows == geometry.input_rows(x) == gram[0, -1, -1]


@pytest.mark.parametrize("channels,group,kernel,attrs", [
    (6, 6, 5, {"pads": [2, 2, 2, 2], "strides": [2, 1]}),  # depthwise 5x5 as in PaddleOCR
    (5, 5, 3, {"pads": [1, 0, 1, 2], "dilations": [1, 2]}),  # depthwise, dilated, uneven padding
    (8, 4, 3, {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),  # two inputs per group
    (9, 3, 2, {"auto_pad": "VALID"}),  # three inputs per group, even kernel
])
def test_grouped_conv_statistics_from_shifted_products_equal_the_unfolded_rows(channels, group, kernel, attrs):
    """Grouped Conv layers take the direct path (no unfolding): same sums as im2col, to float32 rounding."""
    rng = np.random.default_rng(channels)
    w = rng.standard_normal((2 * channels, channels // group, kernel, kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, kernel_shape=[kernel, kernel], **attrs)
    model = make_model([node], [value("x", ["batch", channels, 7, 10])], [value("y", None)], [tensor("w", w)])
    x = rng.standard_normal((3, channels, 7, 10)).astype(np.float32)
    with Session(model) as session:
        y = session.run({"x": x})["y"]
    geometry = LayerGeometry.conv(node, w.shape)
    assert geometry.direct
    assert_statistics_match(geometry, x, y)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(1, 2), st.tuples(*[st.integers(1, 4)] * 2),
       st.tuples(*[st.integers(1, 3)] * 2), st.tuples(*[st.integers(1, 2)] * 2), st.tuples(*[st.integers(0, 3)] * 4),
       st.tuples(*[st.integers(1, 9)] * 2), st.integers(0, 10**6))
def test_direct_grouped_statistics_equal_the_unfolded_rows_for_any_geometry(groups, per_group, outs, kernel, strides,
                                                                            dilations, pads, size, seed):
    geometry = LayerGeometry(groups, per_group * kernel[0] * kernel[1], outs, 1, kernel, strides, dilations, pads)
    assert geometry.direct
    lines = [(n + a + b - (k - 1) * d - 1) // s + 1 for n, (a, b), k, d, s
             in zip(size, geometry._pads(size), kernel, dilations, strides)]
    if min(lines) < 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, groups * per_group, *size)).astype(np.float32)
    assert_statistics_match(geometry, x, rng.standard_normal((2, groups * outs, *lines)).astype(np.float32))


def test_ungrouped_and_wide_group_convs_keep_the_unfolded_rows():
    """The negative twin: one group, or more inputs per group than the direct path pays off for."""
    assert not LayerGeometry(1, 9, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)).direct
    assert not LayerGeometry(2, 5 * 9, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)).direct  # 5 channels a group
    assert not LayerGeometry(4, 3, 1, 1, (3,), (1,), (1,), (1, 1)).direct  # 1-D Conv
    assert not LayerGeometry.linear(8, 4).direct


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.tuples(*[st.integers(1, 3)] * 2),
       st.tuples(*[st.integers(1, 2)] * 2), st.tuples(*[st.integers(1, 2)] * 2), st.tuples(*[st.integers(0, 2)] * 4),
       st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]), st.tuples(*[st.integers(1, 8)] * 2),
       st.lists(st.integers(1, 3), min_size=1, max_size=3), st.sampled_from([0, 1, 5]), st.integers(0, 10**6))
def test_conv_rows_unfolded_from_the_batches_equal_those_of_the_joined_padded_input(
        groups, per_group, outs, kernel, strides, dilations, pads, auto_pad, size, batches, chunk_rows, seed):
    """A Conv's rows and targets come straight from its list of batches (no joined or padded copy): the same
    chunks, bit for bit, as unfolding the joined, padded input (chunks of whole samples or, when a chunk holds
    ``chunk_rows`` rows, fewer than a sample's, runs of output lines)."""
    import onnxopt.reconstruction.statistics as statistics

    geometry = LayerGeometry(groups, per_group * kernel[0] * kernel[1], outs, 1, kernel, strides, dilations, pads,
                             auto_pad)
    spatial_pads = geometry._pads(size)
    lines = [(n + a + b - (k - 1) * d - 1) // s + 1 for n, (a, b), k, d, s
             in zip(size, spatial_pads, kernel, dilations, strides)]
    if min(lines) < 1:
        return
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((n, groups * per_group, *size)).astype(np.float32) for n in batches]
    ys = [rng.standard_normal((n, groups * outs, *lines)).astype(np.float32) for n in batches]
    joined_x, joined_y = np.concatenate(xs), np.concatenate(ys)
    features = geometry.inputs * groups
    limit = 4 * features * chunk_rows if chunk_rows else statistics.CHUNK_BYTES
    original = statistics.CHUNK_BYTES
    statistics.CHUNK_BYTES = limit
    try:
        columns, targets = list(geometry.columns(xs)), list(geometry.targets(ys))
        padded = list(geometry._line_columns(joined_x, spatial_pads))
        reference = [np.moveaxis(p.reshape(len(p), groups, outs, -1), 1, 0).swapaxes(2, 3).reshape(groups, -1, outs)
                     for p in statistics._chunks(joined_y, joined_y.shape[2:], features)]
    finally:
        statistics.CHUNK_BYTES = original
    assert len(columns) == len(padded) == len(targets) == len(reference)
    for new, old in zip(columns + targets, padded + reference):
        np.testing.assert_array_equal(new, old)
    assert sum(c.shape[2] for c in columns) == geometry.input_rows(xs) == geometry.output_rows(ys)


@pytest.mark.parametrize("shape,axis,transposed", [((2, 5, 1000), -1, False), ((2, 700, 3), -2, False),
                                                   ((1, 9, 300), -2, True), ((1, 4, 100), -1, False),
                                                   ((1, 3, 0), -1, False)])
def test_row_sums_by_blocks_are_float64_sums_to_float32_rounding_of_a_block(shape, axis, transposed):
    from onnxopt.reconstruction.statistics import _row_sums

    values = np.random.default_rng(3).standard_normal(shape).astype(np.float32) + 0.5
    if transposed:  # a linear layer's rows: the transposed view
        values = np.swapaxes(values, 1, 2)
    sums = _row_sums(values, axis)
    exact = values.sum(axis=axis, dtype=np.float64)
    assert sums.dtype == np.float64 and sums.shape == exact.shape
    np.testing.assert_allclose(sums, exact, rtol=0, atol=1e-6 * max(np.abs(values).sum(), 1.0))


def test_masked_refit_of_a_stack_equals_one_call_per_group():
    rng = np.random.default_rng(11)
    grams, crosses, starts, keeps = [], [], [], []
    for group in range(5):
        x = correlated(200, 10, 4, seed=group)
        grams.append(x.T @ x)
        crosses.append(x.T @ rng.standard_normal((200, 2)))
        starts.append(rng.standard_normal((10, 2)))
        keeps.append(rng.random((10, 2)) < 0.6)
    keeps[2][:] = False  # a group with nothing kept stays as it is
    stacked, _ = masked_refit(np.stack(grams), np.stack(crosses), np.stack(starts), np.stack(keeps), 0.05)
    for group in range(5):
        alone, _ = masked_refit(grams[group], crosses[group], starts[group], keeps[group], 0.05)
        np.testing.assert_allclose(stacked[group], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stacked[2], starts[2])
    unmasked, _ = masked_refit(np.stack(grams), np.stack(crosses), np.stack(starts), None, 0.05)
    np.testing.assert_allclose(unmasked[1], masked_refit(grams[1], crosses[1], starts[1], None, 0.05)[0], rtol=1e-9)


def test_statistics_merge_equals_one_stream_and_target_mismatch_is_refused():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 3, 8)).astype(np.float32)
    y = rng.standard_normal((10, 3, 5)).astype(np.float32)
    geometry = LayerGeometry.linear(8, 5)
    whole = LayerStatistics.empty(geometry, bias=True, target=True)
    assert whole.update(geometry, x, y)
    parts = [LayerStatistics.empty(geometry, bias=True, target=True) for _ in range(2)]
    assert parts[0].update(geometry, x[:4], y[:4]) and parts[1].update(geometry, x[4:], y[4:])
    merged = parts[0].merge(parts[1])
    np.testing.assert_allclose(merged.gram, whole.gram, rtol=1e-5, atol=1e-5)  # float32 products
    np.testing.assert_allclose(merged.cross, whole.cross, rtol=1e-5, atol=1e-5)
    assert merged.rows == whole.rows == 30 and whole.gram[0, -1, -1] == 30
    assert not LayerStatistics.empty(geometry, target=True).update(geometry, x, y[..., :4])
    w = rng.standard_normal((1, 9, 5))
    a = np.concatenate([x.reshape(-1, 8), np.ones((30, 1))], axis=1)
    assert whole.residual(w) == pytest.approx(float(np.sum((a @ w[0] - y.reshape(-1, 5)) ** 2)), rel=1e-5)


# --------------------------------------------------------------------------- shrinkage of XᵀX


def off_diagonal_square(a: np.ndarray) -> float:
    return float(np.sum(a * a) - np.sum(np.diag(a) ** 2))


@settings(max_examples=25, deadline=None)
@given(samples=st.integers(1, 6), rows=st.integers(1, 5), k=st.integers(1, 7), split=st.integers(0, 6),
       chunk_bytes=st.sampled_from([32 << 20, 64]), seed=st.integers(0, 99))
def test_noise_sums_are_their_definition_and_merge_like_the_sums(samples, rows, k, split, chunk_bytes, seed):
    """``row_noise = Σ_rows Σ_{i≠j} (x_i x_j)²``, ``sample_noise = Σ_samples Σ_{i≠j} (X_sᵀX_s)²_ij``, whatever the
    chunking; statistics of two shards merge into the statistics of the whole."""
    from onnxopt.reconstruction import statistics

    x = np.random.default_rng(seed).standard_normal((samples, rows, k)).astype(np.float32)
    geometry = LayerGeometry.linear(k, 1)
    original = statistics.CHUNK_BYTES
    statistics.CHUNK_BYTES = chunk_bytes
    try:
        whole = LayerStatistics.empty(geometry, noise=True)
        whole.update(geometry, x)
        parts = [LayerStatistics.empty(geometry, noise=True) for _ in range(2)]
        split = min(split, samples)
        for part, piece in zip(parts, (x[:split], x[split:])):
            if len(piece):
                part.update(geometry, piece)
    finally:
        statistics.CHUNK_BYTES = original
    x64 = x.astype(np.float64)
    rows_expected = sum(off_diagonal_square(np.outer(r, r)) for r in x64.reshape(-1, k))
    samples_expected = sum(off_diagonal_square(s.T @ s) for s in x64)
    scale = 1e-6 * float(np.sum(x64 ** 2)) ** 2  # float32 products: differences of sums of this size
    assert whole.row_noise[0] == pytest.approx(rows_expected, rel=1e-4, abs=scale)
    assert whole.sample_noise == pytest.approx(samples_expected, rel=1e-4, abs=scale)
    assert whole.samples == samples and whole.rows == samples * rows
    merged = parts[0].merge(parts[1])
    assert (merged.samples, merged.rows) == (whole.samples, whole.rows)
    assert merged.sample_noise == pytest.approx(whole.sample_noise, rel=1e-4, abs=scale)
    np.testing.assert_allclose(merged.shrinkage(), whole.shrinkage(), rtol=1e-4, atol=1e-6)


def test_shrinkage_is_near_one_for_white_inputs_over_few_rows_and_near_zero_for_correlated_ones():
    geometry = LayerGeometry.linear(64, 1)
    white = LayerStatistics.empty(geometry, noise=True)
    white.update(geometry, np.random.default_rng(0).standard_normal((40, 64)))  # 40 rows, 64 inputs: singular XᵀX
    correlated_rows = LayerStatistics.empty(geometry, noise=True)
    correlated_rows.update(geometry, correlated(4000, 64, 4))
    assert white.shrinkage()[0] > 0.9 and correlated_rows.shrinkage()[0] < 0.05
    with pytest.raises(ValueError, match="noise=True"):
        LayerStatistics.empty(geometry).shrinkage()
    shrunk = white.shrunk_hessian()[0]
    np.testing.assert_allclose(np.diag(shrunk), np.diag(white.hessian[0]))  # the diagonal is kept
    np.testing.assert_allclose(shrunk - np.diag(np.diag(shrunk)),
                               (1 - white.shrinkage()[0]) * (white.hessian[0] - np.diag(np.diag(white.hessian[0]))))


def test_shrinkage_counts_a_sample_whose_rows_move_together_as_one_observation():
    """Six sequences of 32 near-copies of one row each: 192 rows but six observations. Rows alone would call
    the off-diagonal sums well measured; the samples say they are noise."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 1, 64)) + 0.01 * rng.standard_normal((6, 32, 64))
    geometry = LayerGeometry.linear(64, 1)
    stats = LayerStatistics.empty(geometry, noise=True)
    stats.update(geometry, x)
    h = stats.hessian[0]
    by_rows = stats.row_noise[0] / off_diagonal_square(h) - 1 / stats.rows
    assert by_rows < 0.2 < 0.8 < stats.shrinkage()[0]


@pytest.mark.parametrize("group,attrs", [(1, {"pads": [1, 0, 1, 2], "strides": [2, 1]}), (4, {"strides": [2, 2]})])
def test_paired_statistics_give_the_reference_inputs_times_the_weight_as_target(group, attrs):
    """``cross @ W`` of :meth:`update_pair` is ``Σ Aᵀ (A_ref W)``: the reference layer's output as a target."""
    node, w, x, _ = conv_case(group, **attrs)
    geometry = LayerGeometry.conv(node, w.shape)
    reference = x + 0.3 * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    paired = LayerStatistics.empty(geometry, bias=True)
    assert paired.update_pair(geometry, [x[:2], x[2:]], [reference[:2], reference[2:]])
    alone = LayerStatistics.empty(geometry, bias=True)
    assert alone.update(geometry, x)
    np.testing.assert_allclose(paired.gram, alone.gram, rtol=1e-5, atol=1e-3)
    ones = np.ones((group, 1, geometry.input_rows(x)), np.float32)
    a, r = (np.concatenate([np.concatenate(list(geometry.columns(v)), axis=2), ones], axis=1) for v in (x, reference))
    np.testing.assert_allclose(paired.cross, a @ np.swapaxes(r, 1, 2), rtol=1e-4, atol=1e-2)
    assert not LayerStatistics.empty(geometry, bias=True).update_pair(geometry, [x], [reference[:, :, 1:]])


@pytest.mark.parametrize("paired", [True, False])
def test_fit_error_is_the_output_error_up_to_one_constant(paired):
    """``fit_error`` differs from ``Σ |A W - A_ref R|²`` (rows summed directly) by the same constant for any
    weights, so it ranks weights as the real error does; without a pair, ``A_ref`` is ``A``."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40, 6)).astype(np.float32)
    reference_x = x + 0.2 * rng.standard_normal(x.shape).astype(np.float32) if paired else x
    geometry = LayerGeometry.linear(6, 3)
    sums = LayerStatistics.empty(geometry, bias=True)
    assert sums.update_pair(geometry, list(x), list(reference_x)) if paired else sums.update_batches(geometry, list(x))
    reference = np.vstack([rng.standard_normal((6, 3)), np.zeros((1, 3))])
    a, a_ref = (np.concatenate([v.reshape(-1, 6), np.ones((80, 1))], axis=1) for v in (x, reference_x))
    offsets = []
    for _ in range(3):
        w = rng.standard_normal((7, 3))
        offsets.append(np.sum((a @ w - a_ref @ reference) ** 2) - sums.fit_error(0, w, reference))
    np.testing.assert_allclose(offsets, offsets[0], rtol=1e-4)
    np.testing.assert_allclose(offsets[0], np.sum((a_ref @ reference) ** 2), rtol=1e-4)
