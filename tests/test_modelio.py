import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import modelio, tensors
from onnxopt.errors import InputError
from onnxopt.graph import WeightStore
from onnxopt.tensors import is_external, tensor_to_array
from onnxopt.modelio import load_model, save_model

from conftest import assert_same_outputs, feeds_for, mlp


def save_external(model, path: Path) -> None:
    """onnx's own external-data writer (it empties the proto it saves, so it gets a copy)."""
    model = modelio.copy_model(model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def test_load_keeps_external_data_on_disk_and_reads_it_lazily(tmp_path):
    model = mlp(hidden=64)
    save_external(model, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    w1 = next(t for t in loaded.graph.initializer if t.name == "w1")
    assert is_external(w1) and not w1.raw_data
    np.testing.assert_array_equal(WeightStore(loaded.graph).array("w1"),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))


def test_external_model_round_trips_and_outputs_match(tmp_path):
    model = mlp(hidden=64)
    save_external(model, tmp_path / "in.onnx")
    loaded = load_model(tmp_path / "in.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    save_model(loaded, out_dir / "out.onnx")
    assert (out_dir / "out.onnx.data").is_file()
    reread = onnx.load(str(out_dir / "out.onnx"))
    assert_same_outputs(model, reread, feeds_for(model))
    # the in-memory model still reads from the input's data file, which the save did not touch
    (out_dir / "out.onnx.data").unlink()
    assert tensor_to_array(loaded.graph.initializer[0]).shape == (64, 8)


def test_rewritten_external_tensor_goes_to_spill_not_memory(tmp_path):
    model = mlp(hidden=64)
    save_external(model, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    store = WeightStore(loaded.graph)
    store.set_array("w1", np.zeros((64, 8), np.float32))
    w1 = next(t for t in loaded.graph.initializer if t.name == "w1")
    assert is_external(w1) and not w1.raw_data
    assert not store.array("w1").any()
    save_model(loaded, tmp_path / "z.onnx")
    assert not onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(tmp_path / "z.onnx")).graph.initializer if t.name == "w1")).any()


def test_overwriting_the_input_in_place_keeps_the_model_readable(tmp_path):
    model = mlp(hidden=64)
    path = tmp_path / "m.onnx"
    save_external(model, path)
    loaded = load_model(path)
    with pytest.raises(InputError, match="is the input file"):
        save_model(loaded, path, input_path=path)
    save_model(loaded, path, input_path=path, overwrite_input=True)
    assert_same_outputs(model, onnx.load(str(path)), feeds_for(model))
    np.testing.assert_array_equal(tensor_to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))


def test_models_over_two_gigabytes_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "TWO_GB", 2**24 + 100)  # pretend the limit is tiny
    model = mlp(hidden=64)
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert all(not t.raw_data for t in onnx.load(str(tmp_path / "big.onnx"), load_external_data=False).graph.initializer
               if t.name in ("w1", "w2"))
    assert not any(is_external(t) and t.external_data[0].value.endswith("big.onnx.data")
                   for t in model.graph.initializer)  # the in-memory model does not point at the new file


def test_metadata_docs_producer_opsets_and_functions_survive(tmp_path):
    model = mlp()
    model.doc_string = "model doc"
    model.producer_name, model.producer_version = "exporter", "9.9"
    onnx.helper.set_model_props(model, {"author": "me"})
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    save_model(model, tmp_path / "m.onnx")
    back = load_model(tmp_path / "m.onnx")
    assert back.doc_string == "model doc" and back.producer_name == "exporter"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "me"}
    assert [f.name for f in back.functions] == ["F"]
    assert {o.domain for o in back.opset_import} == {"", "local"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"this is not a model at all", "not an ONNX model"),
    ],
)
def test_bad_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_model(path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_files_are_refused(tmp_path, keep):
    model = mlp(hidden=64)
    data = model.SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated"):
        load_model(path)


def test_missing_external_data_file_is_refused(tmp_path):
    save_external(mlp(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(InputError, match="external-data file 'm.onnx.data' .* is missing"):
        load_model(tmp_path / "m.onnx")


def test_truncated_external_data_file_is_refused(tmp_path):
    save_external(mlp(hidden=64), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../x.data"])
def test_external_locations_that_escape_the_folder_are_refused(tmp_path, location):
    model = mlp()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    (tmp_path / "inner").mkdir()
    (tmp_path / "outside.data").write_bytes(b"\0" * 1024)
    path = tmp_path / "inner" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="refused"):
        load_model(path)


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(InputError, match="output folder does not exist"):
        save_model(mlp(), tmp_path / "missing" / "m.onnx")


def test_interrupted_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    save_model(mlp(seed=1), path)
    before = path.read_bytes()

    class Interrupted(Exception):
        pass

    def fail(*_):
        raise Interrupted

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(Interrupted):
        save_model(mlp(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left behind


def test_optimize_validates_external_data_models_without_copying_their_weights(tmp_path):
    import onnxopt

    model = mlp(hidden=64, with_dead_branch=True)
    save_external(model, tmp_path / "in.onnx")
    before = (tmp_path / "in.onnx.data").read_bytes()
    result = onnxopt.optimize(tmp_path / "in.onnx", "dce", output=tmp_path / "out.onnx")
    assert result.report.passed, result.report.failure
    assert result.report.steps[0].checks == {"checker": "ok", "interface": "ok"}
    assert (tmp_path / "out.onnx.data").is_file()
    assert (tmp_path / "in.onnx.data").read_bytes() == before
    assert_same_outputs(model, onnx.load(str(tmp_path / "out.onnx")), feeds_for(model))


def if_model_with_branch_weight() -> onnx.ModelProto:
    """x -> MatMul(w1) -> If(cond: MatMul(a Constant w2 in the then-branch), else: Relu) -> y."""
    rng = np.random.default_rng(0)
    w2 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2")
    then_graph = helper.make_graph([helper.make_node("Constant", [], ["w2"], value=w2),
                                    helper.make_node("MatMul", ["h", "w2"], ["then_y"])], "then", [],
                                   [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, ["b", 64])])
    else_graph = helper.make_graph([helper.make_node("Relu", ["h"], ["else_y"])], "else", [],
                                   [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, ["b", 64])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        [numpy_helper.from_array(rng.standard_normal((4, 64)).astype(np.float32), "w1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_weights_inside_an_if_branch_are_validated_from_memory(tmp_path):
    """onnxruntime checks node attributes (a branch's Constant) and refuses a hard-linked data file there:
    the scratch copy copies those bytes into a file of its own; the twin shows a plain link is refused."""
    import onnxopt
    from onnxopt.validate import run_model

    model = if_model_with_branch_weight()
    save_model(model, tmp_path / "in.onnx", external=True)  # onnx's writer leaves branches inline
    loaded = load_model(tmp_path / "in.onnx")
    then_branch = next(a.g for a in loaded.graph.node[1].attribute if a.name == "then_branch")
    assert is_external(then_branch.node[0].attribute[0].t)
    feed = {"x": np.ones((2, 4), np.float32), "cond": np.array(True)}
    before = (tmp_path / "in.onnx.data").read_bytes()
    expected = run_model(model, [feed])["y"][0]
    np.testing.assert_array_equal(run_model(loaded, [feed])["y"][0], expected)
    result = onnxopt.optimize(tmp_path / "in.onnx", "dce", data=[feed], output=tmp_path / "out.onnx")
    assert result.report.passed, result.report.failure
    assert (tmp_path / "in.onnx.data").read_bytes() == before

    os.link(tmp_path / "in.onnx.data", tmp_path / "linked.data")  # the twin: what a linked scratch copy meets
    import onnxruntime
    with pytest.raises(Exception, match="hard link"):
        onnxruntime.InferenceSession(str(tmp_path / "in.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.999, 1.0, 1.001, 1.5])
def test_serialized_size_above_agrees_with_protobuf_near_the_limit(fraction):
    """Decided from tensor sizes far from the limit, measured near it: the same answer as ByteSize."""
    weights = [numpy_helper.from_array(np.full((64, 64), i, np.float32), f"w{i}") for i in range(4)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("h4", TensorProto.FLOAT, [1, 64])], weights)
    model = helper.make_model(graph)
    limit = int(model.ByteSize() * fraction)
    assert modelio.serialized_size_above(model, limit) == (model.ByteSize() > limit)


# --------------------------------------------------------------------------- the spill file as the output's data


@pytest.fixture
def fresh_spill():
    """A spill file holding nothing from earlier tests (what it holds decides whether a save moves it)."""
    tensors.SPILL.close()
    yield tensors.SPILL
    tensors.SPILL.close()


def rewritten(tmp_path: Path, scale: float = 2.0, hidden: int = 256):
    """A model with external data whose weights (not its biases) a pass rewrote: they sit in the spill file."""
    model = mlp(hidden=hidden)
    save_external(model, tmp_path / "in.onnx")
    loaded = load_model(tmp_path / "in.onnx")
    store = WeightStore(loaded.graph)
    for name in ("w1", "w2"):
        store.set_array(name, store.array(name) * np.float32(scale))
    expected = {t.name: numpy_helper.to_array(t) * np.float32(scale if t.name in ("w1", "w2") else 1)
                for t in model.graph.initializer}
    return loaded, expected


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_final_save_moves_the_spill_file_and_writes_what_the_copying_save_writes(tmp_path, fresh_spill):
    loaded, expected = rewritten(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_model(loaded, tmp_path / "a" / "out.onnx")  # copies: the spill file stays
    spill = fresh_spill.path
    inode = os.stat(spill).st_ino
    save_model(loaded, tmp_path / "b" / "out.onnx", move_spill=True)
    data = tmp_path / "b" / "out.onnx.data"
    assert not Path(spill).exists() and fresh_spill.path is None
    assert os.stat(data).st_ino == inode and os.stat(data).st_nlink == 1  # moved, not copied (onnx.load accepts it)
    copied, moved = initializers(tmp_path / "a" / "out.onnx"), initializers(tmp_path / "b" / "out.onnx")
    assert copied.keys() == moved.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(copied[name], values)
        np.testing.assert_array_equal(moved[name], values)
    info = {e.key: e.value for t in onnx.load(str(tmp_path / "b" / "out.onnx"), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "offset"}
    assert all(int(offset) % modelio.ALIGNMENT == 0 for offset in info.values())
    # the in-memory model now reads the output's data file
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(tensor_to_array(tensor), expected[tensor.name])
    assert_same_outputs(onnx.load(str(tmp_path / "a" / "out.onnx")), onnx.load(str(tmp_path / "b" / "out.onnx")),
                        feeds_for(loaded))


def test_an_error_while_moving_the_spill_file_leaves_no_output(tmp_path, fresh_spill, monkeypatch):
    loaded, expected = rewritten(tmp_path)

    def fail(self, tensor):
        raise OSError("disk full")

    monkeypatch.setattr(tensors.SpillFile, "copy_in", fail)  # appending the biases (in the input's file) fails
    with pytest.raises(OSError, match="disk full"):
        save_model(loaded, tmp_path / "out.onnx", move_spill=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]
    assert fresh_spill.path is not None and Path(fresh_spill.path).exists()  # still the in-memory model's
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(tensor_to_array(tensor), expected[tensor.name])


def test_a_spill_file_holding_mostly_stale_bytes_is_copied_not_moved(tmp_path, fresh_spill):
    loaded, expected = rewritten(tmp_path)
    store = WeightStore(loaded.graph)
    for _ in range(3):  # rewritten again: the earlier versions stay in the spill file, unread
        store.set_array("w1", store.array("w1"))
    spill = fresh_spill.path
    save_model(loaded, tmp_path / "out.onnx", move_spill=True)
    assert fresh_spill.path == spill and Path(spill).exists()
    for name, values in initializers(tmp_path / "out.onnx").items():
        np.testing.assert_array_equal(values, expected[name])


def test_without_move_spill_the_saved_files_stay_independent_of_the_model(tmp_path, fresh_spill):
    loaded, expected = rewritten(tmp_path)
    save_model(loaded, tmp_path / "out.onnx")
    (tmp_path / "out.onnx.data").unlink()
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(tensor_to_array(tensor), expected[tensor.name])


def test_reading_into_a_buffer_and_counting_zeros_in_chunks(tmp_path):
    model = mlp(hidden=64)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.where(np.arange(512).reshape(64, 8) % 3 == 0, 0, 1).astype(np.float32), "w1"))
    save_external(model, tmp_path / "m.onnx")
    w1 = load_model(tmp_path / "m.onnx").graph.initializer[0]
    buffer = np.empty(512, np.float32)
    values = tensor_to_array(w1, out=buffer)
    assert np.shares_memory(values, buffer) and values.shape == (64, 8)
    np.testing.assert_array_equal(values, numpy_helper.to_array(model.graph.initializer[0]))
    assert tensors.count_zeros(w1, chunk_bytes=100) == tensors.count_zeros(w1) == 171
    assert tensors.count_zeros(model.graph.initializer[0]) == 171
    (tmp_path / "m.onnx.data").write_bytes((tmp_path / "m.onnx.data").read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated"):
        tensors.count_zeros(w1, chunk_bytes=100)
