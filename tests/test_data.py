import numpy as np
import pytest
from onnx import numpy_helper

from onnxopt import data
from onnxopt.data import FeedSet, StoredRows, as_feeds, load_feeds, parse_input_shapes, random_feeds
from onnxopt.errors import InputError

from conftest import mlp


def test_npz_is_sample_major(tmp_path):
    x = np.arange(3 * 2 * 8, dtype=np.float32).reshape(3, 2, 8)
    np.savez(tmp_path / "d.npz", x=x)
    feeds = as_feeds(str(tmp_path / "d.npz"), mlp())
    samples = list(feeds)
    assert len(samples) == 3 and samples[1]["x"].shape == (2, 8)
    np.testing.assert_array_equal(samples[2]["x"], x[2])
    batch = next(feeds.batches(2))
    assert batch["x"].shape == (4, 8)


def test_test_data_folder_is_read_by_position(tmp_path):
    for i in range(2):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        tensor = numpy_helper.from_array(np.full((1, 8), i, np.float32))
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    feeds = as_feeds(str(tmp_path), mlp())
    assert list(feeds.arrays) == ["x"] and feeds.arrays["x"].shape == (2, 1, 8)


def test_iterable_of_feed_dicts_is_accepted():
    feeds = as_feeds([{"x": np.zeros((1, 8), np.float32)} for _ in range(5)], mlp())
    assert len(feeds) == 5


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"other": np.zeros((2, 1, 8), np.float32)}, "no array for model input 'x'"),
        ({"x": np.zeros((2, 1, 8), np.float64)}, "is float64, the model wants float32"),
        ({"x": np.zeros((2, 8), np.float32)}, "rank 1"),
        ({"x": np.zeros((2, 1, 7), np.float32)}, "axis 1 is 7, the model wants 8"),
        ({"x": np.full((2, 1, 8), np.nan, np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 1, 8), np.float32)}, "no samples"),
    ],
)
def test_mismatched_data_is_refused(arrays, message):
    with pytest.raises(InputError, match=message):
        FeedSet(arrays, "d.npz").check(mlp())


def test_unreadable_data_files_are_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_feeds(bad)
    with pytest.raises(InputError, match="not found"):
        load_feeds(tmp_path / "missing.npz")


def test_random_feeds_are_seeded_and_say_what_they_assumed():
    a, notes = random_feeds(mlp(), count=2, seed=3)
    b, _ = random_feeds(mlp(), count=2, seed=3)
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
    assert a.arrays["x"].shape == (2, 1, 8)
    assert "symbolic dims batch taken as 1" in notes[1]
    shaped, notes = random_feeds(mlp(), count=1, input_shapes={"x": (5, 8)})
    assert shaped.arrays["x"].shape == (1, 5, 8) and len(notes) == 1


def test_input_shape_specs():
    assert parse_input_shapes(["x=1,3,224,224"]) == {"x": (1, 3, 224, 224)}
    with pytest.raises(InputError, match="NAME=D1,D2"):
        parse_input_shapes(["x=1,a"])


# --------------------------------------------------------------------------- rows read from disk


def _saved(tmp_path, compressed: bool, **arrays):
    path = tmp_path / ("c.npz" if compressed else "u.npz")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_are_read_on_demand_and_equal_the_arrays(tmp_path, monkeypatch, compressed):
    monkeypatch.setattr(data, "INFLATE_WHOLE_BYTES", 0)  # stream compressed members too
    x = np.random.default_rng(0).standard_normal((23, 1, 8)).astype(np.float32)
    ids = np.arange(23, dtype=np.int64)
    feeds = load_feeds(_saved(tmp_path, compressed, x=x, ids=ids))
    assert all(isinstance(a, StoredRows) for a in feeds.arrays.values())
    assert feeds.arrays["x"].shape == x.shape and feeds.arrays["x"].dtype == x.dtype and len(feeds) == 23
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in feeds.batches(5)]), x.reshape(-1, 8))
    np.testing.assert_array_equal(np.stack([s["ids"] for s in feeds]), ids)
    rest = feeds.window(7, 23)  # windows read nothing until used, and read backwards as well
    np.testing.assert_array_equal(rest.arrays["x"][-1], x[-1])
    np.testing.assert_array_equal(rest.arrays["x"][0], x[7])
    np.testing.assert_array_equal(np.asarray(feeds.head(4).arrays["ids"]), ids[:4])
    feeds.check(mlp())


def test_small_compressed_and_fortran_members_are_loaded_whole(tmp_path):
    x = np.zeros((2, 1, 8), np.float32)
    assert isinstance(load_feeds(_saved(tmp_path, True, x=x)).arrays["x"], np.ndarray)
    fortran = load_feeds(_saved(tmp_path, False, x=np.asfortranarray(np.arange(16.0).reshape(2, 8))))
    assert isinstance(fortran.arrays["x"], np.ndarray)


def test_data_file_truncated_after_loading_is_a_clear_error(tmp_path):
    path = _saved(tmp_path, False, x=np.ones((64, 1, 8), np.float32))
    feeds = load_feeds(path)
    path.write_bytes(path.read_bytes()[:1200])  # rows past the first few are gone
    np.testing.assert_array_equal(feeds.arrays["x"][0], np.ones((1, 8), np.float32))
    with pytest.raises(InputError, match="truncated"):
        list(feeds.batches(16))


def test_nan_deep_in_stored_rows_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHECK_BYTES", 64)  # several chunks
    x = np.ones((40, 1, 8), np.float32)
    x[37, 0, 3] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        load_feeds(_saved(tmp_path, False, x=x)).check(mlp())


def test_member_shorter_than_its_header_says_is_refused(tmp_path):
    """Rows are read by offset: a header that claims more rows would read the bytes after the member."""
    path = _saved(tmp_path, False, x=np.arange(80, dtype=np.float32).reshape(10, 8))
    damaged = path.read_bytes().replace(b"(10, 8)", b"(12, 8)")
    path.write_bytes(damaged)
    with pytest.raises(InputError, match="damaged .*'x.npy' is shorter than its \\(12, 8\\) array"):
        load_feeds(path)


def test_datetime_members_are_read_by_rows(tmp_path):
    stamps = np.arange(4).astype("M8[D]")
    feeds = load_feeds(_saved(tmp_path, False, x=np.zeros((4, 1, 8), np.float32), t=stamps))
    assert isinstance(feeds.arrays["t"], StoredRows)
    np.testing.assert_array_equal(np.stack([s["t"] for s in feeds]), stamps)


def test_corrupted_compressed_member_read_later_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "INFLATE_WHOLE_BYTES", 0)  # stream it: damage shows only when rows are read
    path = _saved(tmp_path, True, x=np.random.default_rng(0).standard_normal((512, 1, 8)).astype(np.float32))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(damaged)
    feeds = load_feeds(path)
    with pytest.raises(InputError, match="damaged"):
        list(feeds.batches(64))


def test_sequence_in_a_test_data_folder_is_refused_clearly(tmp_path):
    """A SequenceProto parses as a TensorProto; only reading its values shows what it is."""
    folder = tmp_path / "test_data_set_0"
    folder.mkdir()
    sequence = numpy_helper.from_list([np.ones(2, np.float32)], "x")
    (folder / "input_0.pb").write_bytes(sequence.SerializeToString())
    with pytest.raises(InputError, match="input_0.pb: not a serialized TensorProto"):
        load_feeds(tmp_path)


def test_flipped_byte_in_an_uncompressed_member_fails_its_crc(tmp_path):
    """Rows are read by offset without zip's CRC check, so the data check verifies it once."""
    path = _saved(tmp_path, False, x=np.ones((8, 1, 8), np.float32))
    data = bytearray(path.read_bytes())
    data[data.index(np.float32(1).tobytes()) + 1] ^= 0x01  # still a finite float
    path.write_bytes(bytes(data))
    feeds = load_feeds(path)
    with pytest.raises(InputError, match="fails its CRC check"):
        feeds.check(mlp())
    load_feeds(_saved(tmp_path, False, x=np.ones((8, 1, 8), np.float32))).check(mlp())  # intact: no complaint


def test_inputs_without_declared_shape_are_still_checked_for_nan():
    import onnx
    from onnx import helper

    model = onnx.helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]))
    with pytest.raises(InputError, match="NaN or Inf"):
        FeedSet({"x": np.array([[np.nan]], np.float32)}, "t").check(model)


def test_scalar_samples_feed_onnxruntime_as_0d_arrays():
    """A sample of a 0-d input (an If condition) is fed as a 0-d array: onnxruntime refuses numpy scalars."""
    import onnx
    from onnx import helper

    from onnxopt.validate import run_model

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Not", ["flag"], ["y"])], "g",
        [helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, [])]))
    feeds = FeedSet({"flag": np.array([True, False])}, "t")
    assert all(isinstance(s["flag"], np.ndarray) and s["flag"].ndim == 0 for s in feeds)
    outputs = run_model(model, feeds)
    assert [bool(o) for o in outputs["y"]] == [False, True]


def test_npz_member_that_is_not_an_array_is_named(tmp_path):
    import zipfile

    path = _saved(tmp_path, False, x=np.ones((2, 1, 8), np.float32))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "notes")
    with pytest.raises(InputError, match="member 'README.txt' is not a .npy array"):
        load_feeds(path)
