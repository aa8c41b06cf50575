"""samples/: the models build, check, run and classify, and the committed files match a fresh build."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.data import load_feeds

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NAMES = ("mlp", "cnn", "transformer")


def _load_builder():
    name = "onnxopt_samples_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLES / "build_samples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # onnxscript's @script reads the defining module's globals
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_builder()


@pytest.fixture(scope="module")
def built(builder):
    return builder.build_all()


def test_builds_the_three_models(built):
    assert tuple(built) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid_and_runs(built, builder, name):
    sample = built[name]
    model = sample.model
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    (data_input,) = model.graph.input
    assert data_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(model.graph.initializer) > 0
    for feeds in (sample.calib, sample.eval):
        assert set(feeds) == {data_input.name}
        arr = feeds[data_input.name]
        assert arr.shape[:2] == (64, 1) and arr.dtype == np.float32
    outputs = builder.run(model, sample.eval)
    assert all(np.isfinite(o).all() for o in outputs)
    if sample.labels is not None:
        assert builder.accuracy(model, sample.eval, sample.labels) >= 0.9


@pytest.mark.parametrize("name", NAMES)
def test_committed_files_equal_a_fresh_build(built, name):
    sample = built[name]
    committed = onnx.load(SAMPLES / f"{name}.onnx")
    fresh = {t.name: numpy_helper.to_array(t) for t in sample.model.graph.initializer}
    stored = {t.name: numpy_helper.to_array(t) for t in committed.graph.initializer}
    assert list(stored) == list(fresh)
    for key, arr in fresh.items():
        assert stored[key].dtype == arr.dtype and stored[key].tobytes() == arr.tobytes(), key
    assert committed.SerializeToString() == sample.model.SerializeToString()

    for kind, arrays in (("calib", sample.calib), ("eval", sample.eval)):
        feeds = load_feeds(SAMPLES / f"{name}.{kind}.npz")
        feeds.check(committed)
        assert set(feeds.arrays) == set(arrays)
        for key, arr in arrays.items():
            assert feeds.arrays[key].tobytes() == arr.tobytes() and feeds.arrays[key].shape == arr.shape
    labels_path = SAMPLES / f"{name}.labels.npz"
    assert labels_path.exists() == (sample.labels is not None)
    if sample.labels is not None:
        with np.load(labels_path) as npz:
            assert npz["labels"].dtype == np.int64
            np.testing.assert_array_equal(npz["labels"], sample.labels)


def test_samples_folder_is_small():
    assert sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file()) < 1_500_000
