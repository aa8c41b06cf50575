import numpy as np
import pytest
from onnx import numpy_helper

from onnxopt.data import FeedSet, as_feeds, load_feeds, parse_input_shapes, random_feeds
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
