"""Learned rounding (AdaRound) and its learning-rate schedules; quantize(rounding=learned)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from onnx import helper, numpy_helper

from conftest import make_model, run, tensor, value
from onnxopt.data import FeedSet
from onnxopt.errors import InputError
from onnxopt.passes.base import PassContext
from onnxopt.passes.quantize import HOLDOUT_MAX_SAMPLES, QuantizePass, _holdout, _top1_flips
from onnxopt.reconstruction import Schedule, learned_rounding
from onnxopt.reconstruction.rounding import layer_error, refine_codes


def correlated(rows: int, inputs: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, inputs)) + 0.3 * rng.standard_normal((rows, inputs))


def test_schedules_warm_up_then_decay_as_named():
    rates = {kind: [Schedule(kind, rate=1.0, steps=100, warmup=0.1)(s) for s in range(100)]
             for kind in ("cosine", "step", "exponential", "constant")}
    for curve in rates.values():
        assert curve[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up
    assert rates["constant"][10:] == [1.0] * 90
    assert rates["cosine"][10] == 1.0 and rates["cosine"][-1] < 1e-3
    assert rates["step"][54] == 1.0 and rates["step"][56] == pytest.approx(0.1) and rates["step"][-1] == pytest.approx(0.01)
    assert rates["exponential"][-1] == pytest.approx(0.01, rel=0.06)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Schedule("linear")


@pytest.mark.parametrize("qmax", [7, 127])
@pytest.mark.parametrize("kind,optimizer,rate", [("constant", "adam", 0.1), ("cosine", "adam", 0.3),
                                                  ("exponential", "adam", 0.3), ("step", "adam", 0.3)])
def test_learned_rounding_beats_nearest_on_correlated_inputs(qmax, kind, optimizer, rate):
    x = correlated(2048, 64, 8)
    w = np.random.default_rng(1).standard_normal((64, 16)) * 0.1
    scale = np.abs(w).max(axis=0) / qmax
    codes, curve, learned = learned_rounding(w, x.T @ x, scale, qmin=-qmax, qmax=qmax,
                                             schedule=Schedule(kind, rate, 200), optimizer=optimizer)
    nearest = np.clip(np.rint(w / scale), -qmax, qmax)
    assert learned and codes.min() >= -qmax and codes.max() <= qmax and len(curve) == 50
    assert np.all(np.abs(codes - w / scale) < 1 + 1e-9)  # rounded down or up, never further
    h = x.T @ x
    assert layer_error(codes * scale - w, h) < 0.9 * layer_error(nearest * scale - w, h)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([7, 127]))
def test_learned_rounding_is_never_worse_than_nearest(seed, qmax):
    """Uncorrelated inputs leave nothing to learn: nearest comes back whenever it is better."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 12)) * rng.uniform(0.1, 3, 12)
    w = rng.standard_normal((12, 5))
    scale = np.abs(w).max(axis=0) / qmax
    h = x.T @ x
    codes, _, learned = learned_rounding(w, h, scale, qmin=-qmax, qmax=qmax, schedule=Schedule(steps=30))
    nearest = np.clip(np.rint(w / scale), -qmax, qmax)
    assert layer_error(codes * scale - w, h) <= layer_error(nearest * scale - w, h) * (1 + 1e-12)
    if not learned:
        assert np.array_equal(codes, nearest)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 5), st.sampled_from([3, 8]))
def test_refined_codes_never_raise_the_layer_error_and_stay_on_the_grid(seed, rank, block):
    """Each one-step move is exact (columns are independent), so the error only falls; codes stay in range."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, rank)) @ rng.standard_normal((rank, 10)) + 0.01 * rng.standard_normal((40, 10))
    h = x.T @ x
    w = rng.standard_normal((10, 4))
    scale, zero = np.abs(w).max(axis=0) / 7, 8.0
    start = np.clip(np.rint(w / scale) + zero + rng.integers(-2, 3, w.shape), 0, 15)
    codes, moves = refine_codes(start, w, h, scale, zero, qmin=0, qmax=15, sweeps=4, block=block)
    before, after = (layer_error((c - zero) * scale - w, h) for c in (start, codes))
    assert after <= before * (1 + 1e-12) and codes.min() >= 0 and codes.max() <= 15
    assert (moves > 0) == (not np.array_equal(codes, start))
    if moves:
        assert after < before


def test_refining_optimal_codes_moves_nothing():
    h = np.eye(6)
    w = np.arange(24, dtype=np.float64).reshape(6, 4) - 12  # on the grid: zero error
    codes, moves = refine_codes(w + 8, w, h, np.ones(4), 8.0, qmin=0, qmax=31)
    assert moves == 0 and np.array_equal(codes, w + 8)


def test_sgd_runs_and_never_returns_worse_than_nearest():
    x = correlated(512, 32, 4)
    w = np.random.default_rng(2).standard_normal((32, 8))
    scale = np.abs(w).max(axis=0) / 7
    h = x.T @ x
    codes, curve, _ = learned_rounding(w, h, scale, qmin=-7, qmax=7, schedule=Schedule("cosine", 10.0, 60),
                                       optimizer="sgd")
    nearest = np.clip(np.rint(w / scale), -7, 7)
    assert len(curve) == 50 and layer_error(codes * scale - w, h) <= layer_error(nearest * scale - w, h)


def test_bad_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of adam|sgd"):
        learned_rounding(np.ones((2, 2)), np.eye(2), np.ones(2), qmin=-7, qmax=7, optimizer="lbfgs")


def correlated_mlp():
    """x[b,32] -> Gemm(transB) 24 -> Relu -> MatMul 8: weights large enough for int8 rounding to show."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [tensor("w1", rng.standard_normal((24, 32)).astype(np.float32)),
             tensor("b1", rng.standard_normal(24).astype(np.float32)),
             tensor("w2", rng.standard_normal((24, 8)).astype(np.float32))]
    model = make_model(nodes, [value("x", ["batch", 32])], [value("y", ["batch", 8])], inits)
    x = correlated(256, 32, 4, seed=3)[:, None, :].astype(np.float32)
    return model, FeedSet({"x": x}, "correlated")


def output_error(model, reference, feeds) -> float:
    a = np.concatenate([run(model, f)[0] for f in feeds])
    b = np.concatenate([run(reference, f)[0] for f in feeds])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("options", [{"mode": "static"}, {"mode": "dynamic"}, {"mode": "auto"},
                                     {"mode": "dynamic", "smooth_alpha": 0.8}])
def test_quantize_learned_rounding_lowers_the_error_and_reports_loss_curves(options):
    """Static QDQ weights, dynamic MatMulInteger weights and smoothed dynamic weights (input statistics
    rescaled by the migration) alike; auto learns the weights of the mode it chose."""
    model, feeds = correlated_mlp()
    learned = QuantizePass(QuantizePass.Options(**options, rounding="learned", rounding_steps=150),
                           PassContext(calib=feeds))(model.__deepcopy__())
    chosen = "dynamic" if learned.stats.get("dynamic_nodes") else "static"  # auto: by measured latency
    assert options["mode"] in ("auto", chosen)
    nearest = QuantizePass(QuantizePass.Options(**{**options, "mode": chosen}), PassContext(calib=feeds))(model.__deepcopy__())
    assert learned.stats["rounding_learned"] + learned.stats.get("rounding_kept_nearest", 0) == 2
    assert learned.stats.get("dynamic_nodes", 0) == nearest.stats.get("dynamic_nodes", 0)
    if "smooth_alpha" in options:
        assert learned.stats["smoothing_mul"] == 2
    curves = learned.details["loss_curves"]
    assert set(curves) == {"fc1", "fc2"} and curves["fc1"]["schedule"] == "constant" and len(curves["fc1"]["loss"]) == 50
    assert "loss_curves" not in nearest.details
    assert output_error(learned.model, model, feeds) < 0.95 * output_error(nearest.model, model, feeds)


@pytest.mark.parametrize("options, message", [({"rounding": "stochastic"}, "rounding must be nearest|learned"),
                                               ({"lr_schedule": "linear"}, "lr_schedule"),
                                               ({"rounding_steps": 0}, "rounding_steps >= 1"),
                                               ({"rounding_holdout": 1.0}, "rounding_holdout must be in")])
def test_bad_rounding_options_are_input_errors(options, message):
    with pytest.raises(InputError, match=message):
        QuantizePass.Options(**options)


@settings(max_examples=40, deadline=None)
@given(samples=st.integers(1, 700), fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]))
@example(samples=10, fraction=0.9)  # a run shorter than its share: the first run's window started at -1
def test_holdout_splits_the_calibration_samples_into_disjoint_parts(samples, fraction):
    """Fitting and held-out samples never overlap and cover the set; the held-out ones are spread over it."""
    feeds = FeedSet({"x": np.arange(samples, dtype=np.float32)[:, None]}, "ids")
    fit, held = _holdout(feeds, fraction)
    if held is None:
        assert fit is feeds and (fraction == 0 or round(samples * fraction) < 1 or samples == 1)
        return
    fit_ids, held_ids = ([int(f["x"][0]) for f in part] for part in (fit, held))
    assert sorted(fit_ids + held_ids) == list(range(samples)) and fit_ids and held_ids
    assert len(held_ids) == min(round(samples * fraction), HOLDOUT_MAX_SAMPLES, samples - 1)
    if len(held_ids) >= 4:
        assert max(held_ids) == samples - 1 and min(held_ids) < samples // 4 + 1  # the tails of 4 runs


def test_holdout_of_a_plain_iterable_takes_every_nth_sample():
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(10)]
    fit, held = _holdout(feeds, 0.25)
    assert [int(f["x"][0, 0]) for f in held] == [3, 7] and len(list(fit)) == 8


def drifting_mlp(held_like_fit: bool):
    """correlated_mlp with calibration samples whose fitting part lies near a 2-dimensional subspace: learned
    rounding, fitted there, is free in the other directions. The held-out samples (the last 4 of every 16:
    the tails of the 4 runs) either come from that subspace too or span every direction."""
    model, _ = correlated_mlp()
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 2)) @ rng.standard_normal((2, 32)) * 3).astype(np.float32)
    if not held_like_fit:
        held = np.arange(64) % 16 >= 12
        x[held] = 3 * rng.standard_normal((int(held.sum()), 32))
    return model, FeedSet({"x": x[:, None, :]}, "drifting")


@pytest.mark.parametrize("held_like_fit", [True, False])
def test_learned_rounding_is_kept_only_where_it_wins_on_held_out_samples(held_like_fit):
    """Positive and negative twin: where the held-out samples look like the fitting ones, learned rounding
    wins there and is kept; where they span directions the fitting samples never showed, it loses there
    and the model is exactly the nearest-rounding one."""
    model, feeds = drifting_mlp(held_like_fit)
    options = {"mode": "static", "rounding_steps": 150}
    learned = QuantizePass(QuantizePass.Options(**options, rounding="learned"), PassContext(calib=feeds))(model.__deepcopy__())
    nearest = QuantizePass(QuantizePass.Options(**options), PassContext(calib=feeds))(model.__deepcopy__())
    check = learned.details["rounding_holdout"]
    assert check["samples"] == 16 and learned.stats["rounding_holdout_samples"] == 16
    assert (check["learned"]["rel_l2"] < check["nearest"]["rel_l2"]) == held_like_fit
    assert check["kept"] == ("learned" if held_like_fit else "nearest")
    assert learned.stats["rounding_holdout_kept_learned"] == int(held_like_fit)
    weights = {t.name: t for t in nearest.model.graph.initializer}
    differs = any(not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(weights[t.name]))
                  for t in learned.model.graph.initializer if t.name in weights)
    assert differs == held_like_fit


def test_no_holdout_learns_from_every_sample_without_a_check():
    model, feeds = correlated_mlp()
    result = QuantizePass(QuantizePass.Options(mode="static", rounding="learned", rounding_holdout=0.0),
                          PassContext(calib=feeds))(model.__deepcopy__())
    assert "rounding_holdout" not in result.details and result.stats["rounding_holdout_skipped"] == 1
    assert result.stats["rounding_learned"] == 2


def test_top1_flips_count_positions_lost_and_won_on_class_scores_only():
    reference = {"scores": [np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])], "value": [np.array([1.0])]}
    before = {"scores": [np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])], "value": [np.array([2.0])]}
    after = {"scores": [np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 1.0]])], "value": [np.array([0.0])]}
    assert _top1_flips(reference, before, after) == (1, 1) and _top1_flips(reference, before, before) == (0, 0)
