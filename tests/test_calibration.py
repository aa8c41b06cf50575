"""Streaming calibration statistics: exact values, invariance to batching and sharding, memory, cache files."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxopt.calibration import TensorStats, collect, load_stats, save_stats
from onnxopt.data import FeedSet, load_feeds
from onnxopt.errors import InputError

from conftest import make_model, mlp, tensor, value


def scaled_relu():
    """x[batch,3,4] -> Mul(2) -> h -> Relu -> y: values numpy reproduces bit for bit."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [value("x", ["batch", 3, 4])], [value("y", ["batch", 3, 4])],
                      [tensor("two", np.array(2.0, np.float32))])


def assert_same_histogram(a, b):
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.code_counts, b.code_counts)


def data(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 3, 4)).astype(np.float32) * 3


def test_exact_statistics_of_inputs_and_intermediates():
    x = data(10)
    stats = collect(scaled_relu(), FeedSet({"x": x}, "t"), ["x", "h", "y"], histogram_bins=16,
                    sumsq_axes={"h": 1})
    h = x * 2
    assert stats["x"].count == x.size and stats["x"].min == x.min() and stats["x"].max == x.max()
    assert stats["h"].min == h.min() and stats["h"].max == h.max()
    assert stats["y"].min == 0.0 and stats["y"].max == h.max()
    np.testing.assert_allclose(stats["h"].channel_sumsq, (h.astype(np.float64) ** 2).sum(axis=(0, 1, 3)))
    # float32 sums within each row, float64 across rows: float32 rounding only
    np.testing.assert_allclose(stats["h"].channel_mean, h.astype(np.float64).mean(axis=(0, 1, 3)), rtol=1e-6)
    assert stats["h"].channel_count == 10 * 4
    assert stats["x"].channel_sum is None and stats["y"].codes is not None


def uniform_histogram(st_):
    """Counts in ``st_.bins`` uniform bins over [min, max] from the grid distribution, and the edges."""
    values, counts = st_.distribution()
    return np.histogram(values, st_.bins, range=(st_.min, st_.max), weights=counts)[0].astype(np.int64), \
        np.linspace(st_.min, st_.max, st_.bins + 1)


def test_histogram_matches_a_direct_fixed_range_histogram_within_grid_rounding():
    x = data(50)
    st_ = collect(scaled_relu(), FeedSet({"x": x}, "t"), ["x"], histogram_bins=32)["x"]
    direct, edges = np.histogram(x.astype(np.float64), 32, range=(float(x.min()), float(x.max())))
    histogram, grid_edges = uniform_histogram(st_)
    assert histogram.sum() == x.size
    np.testing.assert_array_equal(grid_edges, edges)
    # a value moves at most one bin (the grid's 2^-8 relative rounding)
    assert np.abs(np.cumsum(histogram) - np.cumsum(direct)).max() <= 0.03 * x.size


def test_no_histogram_unless_asked():
    stats = collect(scaled_relu(), FeedSet({"x": data(2)}, "t"), ["h"])
    assert stats["h"].codes is None
    with pytest.raises(ValueError, match="no histogram"):
        stats["h"].distribution()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 12), batch=st.integers(1, 8), cut=st.integers(1, 11), seed=st.integers(0, 99))
def test_same_statistics_for_any_batch_size_and_sharding(n, batch, cut, seed):
    """min/max, counts and histograms exactly equal across batch sizes and shard merges."""
    cut = min(cut, n - 1)
    model, x = scaled_relu(), data(n, seed)
    args = dict(tensors=["x", "h", "y"], histogram_bins=8, sumsq_axes={"h": 1})
    one = collect(model, FeedSet({"x": x}, "t"), **args)
    batched = collect(model, FeedSet({"x": x}, "t"), **args, batch_size=batch)
    sample_dicts = collect(model, [{"x": s} for s in x], **args, batch_size=batch)
    left = collect(model, FeedSet({"x": x[:cut]}, "t"), **args)
    right = collect(model, FeedSet({"x": x[cut:]}, "t"), **args)
    for name in args["tensors"]:
        for other in (batched[name], sample_dicts[name], left[name].merge(right[name]), right[name].merge(left[name])):
            assert (other.count, other.min, other.max) == (one[name].count, one[name].min, one[name].max)
            assert_same_histogram(other, one[name])
            if name == "h":
                np.testing.assert_allclose(other.channel_sumsq, one[name].channel_sumsq, rtol=1e-12)
                np.testing.assert_array_equal(other.channel_min, one[name].channel_min)
                np.testing.assert_array_equal(other.channel_max, one[name].channel_max)
    h = x[:, 0] * 2.0  # scaled_relu's h [n, 3, 4]: channel axis 1
    np.testing.assert_array_equal(one["h"].channel_max, h.max(axis=(0, 2)))
    np.testing.assert_array_equal(one["h"].channel_min, h.min(axis=(0, 2)))


def test_matmul_ranges_identical_for_batch_sizes_1_and_8():
    model = mlp(hidden=32)
    x = np.random.default_rng(3).standard_normal((16, 1, 8)).astype(np.float32)
    a = collect(model, FeedSet({"x": x}, "t"), ["h", "r", "m", "y"])
    b = collect(model, FeedSet({"x": x}, "t"), ["h", "r", "m", "y"], batch_size=8)
    assert {k: (v.min, v.max) for k, v in a.items()} == {k: (v.min, v.max) for k, v in b.items()}


def test_peak_memory_does_not_grow_with_sample_count():
    """16 distinct samples, repeated: histograms keep only occupied grid bins, so new values could
    legitimately add bins; the same values must not add anything."""
    model = mlp(hidden=64)
    x = np.random.default_rng(0).standard_normal((16, 1, 8)).astype(np.float32)

    def samples(n):
        return ({"x": x[i % 16]} for i in range(n))

    def peak(n):
        tracemalloc.start()
        collect(model, samples(n), ["x", "h", "r", "m"], histogram_bins=64, sumsq_axes={"r": 1})
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    peak(256)  # warm caches (lazy imports, onnxruntime)
    small, large = peak(16), peak(256)
    assert large <= small * 1.1 + 64 * 1024


def test_data_read_from_an_npz_does_not_grow_memory_with_sample_count(tmp_path):
    """An .npz of 1024 samples calibrates within the memory of one of 256 (held whole, the data
    would add 1.5 MiB): rows are read as runs need them (the samples repeat, so histograms gain no
    bins), and give the statistics of the arrays."""
    model = mlp(hidden=64)
    x = np.random.default_rng(0).standard_normal((16, 64, 8)).astype(np.float32)  # 2 KiB a sample
    paths = {}
    for n in (16, 256, 1024):
        paths[n] = tmp_path / f"{n}.npz"
        np.savez(paths[n], x=np.tile(x, (n // 16, 1, 1)))

    def peak(n):
        tracemalloc.start()
        collect(model, load_feeds(paths[n]), ["x", "h", "r", "m"], histogram_bins=64, sumsq_axes={"r": 1})
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result

    peak(256)
    small, large = peak(256), peak(1024)
    assert large <= small * 1.1 + 64 * 1024
    from_file = collect(model, load_feeds(paths[16]), ["h", "r"], histogram_bins=64)
    in_memory = collect(model, FeedSet({"x": x}, "t"), ["h", "r"], histogram_bins=64)
    for name, expected in in_memory.items():
        assert (from_file[name].min, from_file[name].max) == (expected.min, expected.max)
        np.testing.assert_array_equal(from_file[name].code_counts, expected.code_counts)


def test_no_run_starts_while_an_earlier_runs_values_are_held(monkeypatch):
    """Each run's fetched values are dropped once folded (only the probe's single-sample run lives
    through the joined run it is compared with): held values made onnxruntime allocate new output
    memory run after run (ppocr_cls: peak RSS 220/244 MiB at 16/64 samples, now flat)."""
    import weakref

    from onnxopt.validate import Session

    runs: list[list[weakref.ref]] = []
    real = Session.run

    def run(self, feed, outputs=None):
        checked = runs if len(runs) > 1 else []  # the probe's values live through the joined run
        assert all(r() is None for refs in checked for r in refs), f"run {len(runs)} starts while earlier values are held"
        values = real(self, feed, outputs)
        runs.append([weakref.ref(v) for v in values.values()])
        return values

    monkeypatch.setattr(Session, "run", run)
    collect(scaled_relu(), FeedSet({"x": data(40)}, "t"), ["h", "y"], histogram_bins=8, mean_axes={"h": 1})
    assert len(runs) == 4  # probe (1 sample), joined 16, 16, 8


def test_histograms_keep_only_occupied_grid_bins():
    st_ = TensorStats(bins=8)
    st_.update(np.array([1.0, 1.0, -2.0, 3.0], np.float32))
    st_.update(np.array([1.0, 0.0], np.float32))
    st_.flush()
    assert st_.codes.dtype == np.uint16 and st_.codes.tolist() == sorted(st_.codes.tolist())
    assert dict(zip(st_.codes.tolist(), st_.code_counts.tolist())) == {0: 1, 0x3F80: 3, 0x4040: 1, 0xC000: 1}


def test_code_counts_are_exact_across_buffer_fills_and_batches_bigger_than_the_buffer():
    from onnxopt.calibration import FLUSH_AT

    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(n).astype(np.float32) for n in (5, FLUSH_AT - 3, 7, 3 * FLUSH_AT + 1, 1000, FLUSH_AT)]
    st_ = TensorStats(bins=8)
    for p in parts:
        st_.update(p)
    assert st_._pending.size == FLUSH_AT  # fixed, whatever came in
    st_.flush()
    codes, counts = np.unique(np.concatenate(parts).view(np.uint32) >> 16, return_counts=True)
    np.testing.assert_array_equal(st_.codes, codes.astype(np.uint16))
    np.testing.assert_array_equal(st_.code_counts, counts)


def test_fingerprint_changes_with_one_weight_inline_typed_or_external(tmp_path):
    import onnx

    from onnxopt.calibration import model_fingerprint
    from onnxopt.graph import WeightStore

    def weight_changed(model):
        before = model_fingerprint(model)
        store = WeightStore(model.graph)
        w = store.array("w1")
        changed = w.copy()
        changed.flat[-1] += 1.0  # the last value: beyond any prefix of the data
        store.set_array("w1", changed)
        after = model_fingerprint(model)
        store.set_array("w1", w)
        return before != after

    model = mlp(hidden=2048)  # w1 is 2048 x 8 floats: 64 KiB of raw data
    assert model_fingerprint(model) == model_fingerprint(onnx.load_from_string(model.SerializeToString()))
    assert weight_changed(model)
    # typed fields (float_data), no raw_data
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    t = next(t for t in typed.graph.initializer if t.name == "w1")
    values = onnx.numpy_helper.to_array(t)
    t.ClearField("raw_data")
    t.float_data.extend(values.ravel().tolist())
    before = model_fingerprint(typed)
    t.float_data[-1] += 1.0
    assert model_fingerprint(typed) != before
    # shape only
    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(typed)
    t = next(t for t in reshaped.graph.initializer if t.name == "w1")
    t.dims[:] = [t.dims[1], t.dims[0]]
    assert model_fingerprint(reshaped) != model_fingerprint(typed)
    # external data: raw_data is empty; a rewritten tensor goes to a new place in the spill file
    from onnxopt.modelio import load_model

    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    external = load_model(tmp_path / "m.onnx")  # lazy: tensors stay on disk
    assert all(not t.raw_data for t in external.graph.initializer)
    assert weight_changed(external)


def test_cache_file_round_trip(tmp_path):
    stats = collect(scaled_relu(), FeedSet({"x": data(5)}, "t"), ["x", "h"], histogram_bins=8, sumsq_axes={"h": 1})
    save_stats(tmp_path / "c.npz", stats, "abc")
    loaded, fingerprint = load_stats(tmp_path / "c.npz")
    assert fingerprint == "abc" and list(loaded) == ["x", "h"]
    for name in stats:
        a, b = stats[name], loaded[name]
        assert (a.count, a.min, a.max, a.bins, a.channel_count) == (b.count, b.min, b.max, b.bins, b.channel_count)
        assert_same_histogram(a, b)
    np.testing.assert_array_equal(loaded["h"].channel_sumsq, stats["h"].channel_sumsq)
    assert loaded["x"].channel_sum is None


def test_merge_of_empty_stats_is_identity():
    st_ = TensorStats(bins=4)
    st_.update(np.array([-0.0, 1.5, -2.0], np.float32))
    merged = TensorStats().merge(st_)
    assert (merged.count, merged.min, merged.max) == (3, -2.0, 1.5)
    assert_same_histogram(merged, st_)


def test_negative_zero_does_not_make_min_order_dependent():
    a, b = TensorStats(), TensorStats()
    a.update(np.array([0.0, -0.0, 1.0], np.float32))
    b.update(np.array([-0.0, 0.0, 1.0], np.float32))
    assert str(a.min) == str(b.min) == "0.0"


def test_progress_bar_runs(capsys):
    stats = collect(scaled_relu(), FeedSet({"x": data(3)}, "t"), ["y"], progress=True)
    assert stats["y"].count == 36


@pytest.mark.parametrize("tensors, feeds, message", [
    (["nope"], FeedSet({"x": data(2)}, "t"), "no value named 'nope'"),
    (["h"], FeedSet({"x": data(0)}, "t"), "no samples"),
    (["x"], [{"other": data(1)[0]}], "no array for graph input 'x'"),
])
def test_bad_input_is_a_clear_input_error(tensors, feeds, message):
    with pytest.raises(InputError, match=message):
        collect(scaled_relu(), feeds, tensors)


def test_unreadable_cache_is_an_input_error(tmp_path):
    bad = tmp_path / "c.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a calibration cache"):
        load_stats(bad)


# --------------------------------------------------------------------------- automatic batching, subsampled histograms


def runs_of(model, feeds, fetched):
    from onnxopt.validate import joined_runs as _runs
    from onnxopt.validate import Session

    with Session(model, extra_outputs=fetched) as session:
        return [samples for samples, _, _ in _runs(session, model, feeds, fetched, 0)]


def test_automatic_batching_joins_samples_and_gives_the_statistics_of_one_sample_a_run():
    model, x = scaled_relu(), data(70)
    args = dict(tensors=["x", "h", "y"], histogram_bins=8, mean_axes={"h": 1})
    auto = collect(model, FeedSet({"x": x}, "t"), **args)
    one = collect(model, FeedSet({"x": x}, "t"), **args, batch_size=1)
    for name in args["tensors"]:
        assert (auto[name].count, auto[name].min, auto[name].max) == (one[name].count, one[name].min, one[name].max)
        assert_same_histogram(auto[name], one[name])
    np.testing.assert_allclose(auto["h"].channel_sum, one["h"].channel_sum, rtol=1e-12)
    # probe (sample 0 alone, not folded), then joined batches of MAX_BATCH
    assert runs_of(model, FeedSet({"x": x}, "t"), ["h", "y"]) == [16, 16, 16, 16, 6]


def test_automatic_batch_size_does_not_depend_on_the_sample_count():
    """The same joined batch for 16 and for 256 samples: per-run memory is flat in the sample count."""
    model = scaled_relu()
    assert runs_of(model, FeedSet({"x": data(256)}, "t"), ["h"])[:3] == [16, 16, 16]
    assert runs_of(model, FeedSet({"x": data(16)}, "t"), ["h"]) == [16]


def test_automatic_batching_falls_back_when_joining_would_mix_samples():
    """Reshape to [1, -1] puts every joined sample in one row: one sample a run instead."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Relu", ["flat"], ["y"])]
    model = make_model(nodes, [value("x", ["batch", 3, 4])], [value("y", [1, "n"])],
                       [tensor("shape", np.array([1, -1], np.int64))])
    feeds = FeedSet({"x": data(5)}, "t")
    assert runs_of(model, feeds, ["flat"]) == [1, 1, 1, 1, 1]
    assert collect(model, feeds, ["flat"])["flat"].count == 5 * 12


def test_fixed_batch_axis_runs_one_sample_a_run():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [value("x", [1, 3, 4])], [value("y", [1, 3, 4])])
    assert runs_of(model, FeedSet({"x": data(3)}, "t"), ["y"]) == [1, 1, 1]


def test_big_tensors_histogram_a_per_sample_subsample_identical_for_any_batching():
    from onnxopt.calibration import HIST_PER_SAMPLE, _stride

    x = np.random.default_rng(4).standard_normal((6, 3, 700)).astype(np.float32)  # 2100 values per sample
    stride = _stride(2100)
    assert stride > 1 and np.gcd(stride, 2100) == 1 and -(-2100 // stride) <= HIST_PER_SAMPLE
    whole, single, pairs = TensorStats(bins=8), TensorStats(bins=8), TensorStats(bins=8)
    whole.update(x, samples=6)
    for s in x:
        single.update(s[None])
    for i in range(0, 6, 2):
        pairs.update(x[i:i + 2], samples=2)
    for st_ in (whole, single, pairs):
        st_.flush()
        assert (st_.count, st_.min, st_.max) == (x.size, x.min(), x.max())  # min/max see every value
        assert st_.code_counts.sum() == 6 * len(range(0, 2100, stride))
        assert_same_histogram(st_, whole)


def test_only_the_statistics_asked_for_are_kept():
    stats = collect(scaled_relu(), FeedSet({"x": data(4)}, "t"), ["y"], mean_axes={"h": 1})
    assert stats["h"].channel_sum is not None and stats["h"].channel_sumsq is None
    assert stats["y"].channel_sum is None and stats["y"].codes is None
