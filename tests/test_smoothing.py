"""SmoothQuant-style migration (onnxopt.smoothing): scales from channel statistics, folded into LayerNorm."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.calibration import TensorStats
from onnxopt.smoothing import MIN_GAIN, estimated_error, smoothing_scale


def channel_stats(x: np.ndarray) -> TensorStats:
    st_ = TensorStats()
    st_.update(x, channel_axis=1)
    return st_


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), outlier=st.floats(1.0, 200.0), alpha=st.sampled_from([0.0, 0.5, 0.8]))
def test_a_returned_scale_is_positive_and_lowers_the_estimate_by_the_margin(seed, outlier, alpha):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    x[:, 5] *= outlier
    weights = [rng.standard_normal((12, 7)).astype(np.float32), rng.standard_normal((12, 3)).astype(np.float32)]
    stats = channel_stats(x)
    s, used, ratio = smoothing_scale(stats, weights, 127, alpha)
    if s is None:
        assert ratio >= MIN_GAIN
        return
    assert np.all(np.isfinite(s)) and np.all(s > 0) and (used == alpha or alpha == 0.0)
    base = estimated_error(stats, weights, np.ones(12), 127)
    assert np.isclose(estimated_error(stats, weights, s, 127) / base, ratio) and ratio < MIN_GAIN


def test_outliers_are_migrated_and_even_channels_are_left_alone():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 8)).astype(np.float32)]
    even = channel_stats(rng.uniform(-1, 1, (256, 16)).astype(np.float32))
    assert smoothing_scale(even, weights, 127)[0] is None
    x = rng.uniform(-1, 1, (256, 16)).astype(np.float32)
    x[:, [2, 9]] *= 60
    s, alpha, ratio = smoothing_scale(channel_stats(x), weights, 127)
    assert s is not None and 0 < alpha < 1 and ratio < 0.5
    assert s[2] > 4 * np.median(s) and s[9] > 4 * np.median(s)  # the outlier channels are divided most


def test_without_channel_extremes_there_is_nothing_to_migrate():
    st_ = TensorStats()
    st_.update(np.ones((4, 3), np.float32))  # no channel axis: no per-channel statistics
    assert smoothing_scale(st_, [np.ones((3, 2), np.float32)], 127) == (None, 0.0, 1.0)
