"""flush-subnormals: subnormal weights become zeros of the same sign, everywhere; nothing else moves."""

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from onnxopt.api import optimize
from onnxopt.data import load_feeds
from onnxopt.graph import WeightStore, constant_tensor
from onnxopt.passes.flush_subnormals import FlushSubnormals, flush_subnormal_values
from onnxopt.tensors import is_external, tensor_to_array

from conftest import feeds_for, make_model, run, tensor, value

TINY = np.finfo(np.float32).smallest_normal
SUBNORMALS = np.array([TINY / 2, -TINY / 4, np.float32(1e-45), -np.float32(1e-40)], np.float32)


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def weights(rng, shape, subnormals: bool) -> np.ndarray:
    array = rng.standard_normal(shape).astype(np.float32)
    if subnormals:
        array.ravel()[: SUBNORMALS.size] = SUBNORMALS
    return array


def model_with_weights(subnormals: bool, width: int = 6) -> onnx.ModelProto:
    """x -> MatMul(initializer w1) -> Add(Constant c) -> If(cond: MatMul(then-branch Constant w2), else: Relu) -> y.

    ``subnormals``: each of the three weights carries the four :data:`SUBNORMALS` (12 values in all).
    """
    rng = np.random.default_rng(0)
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w2"], value=tensor("w2", weights(rng, (width, width), subnormals))),
         helper.make_node("MatMul", ["a", "w2"], ["then_y"])],
        "then", [], [value("then_y", ["batch", width])])
    else_graph = helper.make_graph([helper.make_node("Relu", ["a"], ["else_y"])], "else", [],
                                   [value("else_y", ["batch", width])])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Constant", [], ["c"], value=tensor("c", weights(rng, (width,), subnormals))),
        helper.make_node("Add", ["h", "c"], ["a"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    return make_model(nodes, [value("x", ["batch", 4]), value("cond", [], TensorProto.BOOL)],
                      [value("y", ["batch", width])], [tensor("w1", weights(rng, (4, width), subnormals))])


def feeds(cond: bool) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32), "cond": np.array(cond)}


def all_weights(model) -> dict[str, np.ndarray]:
    found = {t.name: tensor_to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = tensor_to_array(constant_tensor(node))
        for branch in node.attribute:
            if branch.type == onnx.AttributeProto.GRAPH:
                for inner in branch.g.node:
                    if inner.op_type == "Constant":
                        found[inner.output[0]] = tensor_to_array(constant_tensor(inner))
    return found


def is_subnormal(array: np.ndarray) -> np.ndarray:
    return (array != 0) & (np.abs(array) < TINY)


def test_initializer_constant_and_if_branch_are_flushed_outputs_equal():
    model = model_with_weights(subnormals=True)
    result = FlushSubnormals()(copy(model))
    assert result.modified and result.stats == {"tensors_flushed": 3, "values_flushed": 12}
    before, after = all_weights(model), all_weights(result.model)
    assert set(after) == {"w1", "c", "w2"}
    for name, original in before.items():
        flushed = is_subnormal(original)
        assert flushed.sum() == 4 and not is_subnormal(after[name]).any()
        assert (after[name][flushed] == 0).all()
        np.testing.assert_array_equal(np.signbit(after[name][flushed]), np.signbit(original[flushed]))  # -0.0 kept
        assert after[name][~flushed].tobytes() == original[~flushed].tobytes()
    onnx.checker.check_model(result.model, full_check=True)
    for cond in (True, False):
        for x, y in zip(run(model, feeds(cond)), run(result.model, feeds(cond)), strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-30)
    again = FlushSubnormals()(copy(result.model))
    assert not again.modified and again.stats == {"tensors_flushed": 0, "values_flushed": 0}


def test_a_model_without_subnormals_is_byte_for_byte_unchanged():
    model = model_with_weights(subnormals=False)
    original = model.SerializeToString()
    result = FlushSubnormals()(model)
    assert not result.modified and result.stats == {"tensors_flushed": 0, "values_flushed": 0}
    assert result.model.SerializeToString() == original


def test_value_floats_constants_float64_bfloat16_flushed_float16_skipped():
    half = np.array([6e-8, 1.0], np.float16)  # a float16 subnormal: a real value there, kept
    double = np.array([5e-324, -1e-310, 1.0], np.float64)
    nodes = [
        helper.make_node("Constant", [], ["floats"], value_floats=[float(TINY / 2), 1.0]),
        helper.make_node("Constant", [], ["float"], value_float=float(-TINY / 8)),
        helper.make_node("Constant", [], ["half"], value=tensor("half", half)),
        helper.make_node("Constant", [], ["double"], value=tensor("double", double)),
        helper.make_node("Constant", [], ["bf16"], value=helper.make_tensor(
            "bf16", TensorProto.BFLOAT16, [2], np.array([0x0001, 0x3F80], np.uint16).tobytes(), raw=True)),
        helper.make_node("Constant", [], ["ints"], value_ints=[0, 1]),
    ]
    names = ["floats", "float", "half", "double", "bf16", "ints"]
    model = make_model(nodes, [], [value(n, None) for n in names])
    result = FlushSubnormals()(model)
    assert result.stats == {"tensors_flushed": 4, "values_flushed": 5, "skipped_float16": 1}
    store = WeightStore(result.model.graph)
    assert store.array("floats").tolist() == [0.0, 1.0]
    assert store.array("float") == 0 and np.signbit(store.array("float"))
    assert store.array("double").tolist() == [0.0, 0.0, 1.0] and np.signbit(store.array("double")[1])
    assert store.array("bf16").view(np.uint16).tolist() == [0, 0x3F80]
    assert store.array("half").tobytes() == half.tobytes()


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
                  elements=st.floats(width=32, allow_subnormal=True) | st.sampled_from(list(SUBNORMALS))))
def test_normals_keep_their_bits_subnormals_become_zero(array):
    original = array.copy()
    flushed, count = flush_subnormal_values(array, TensorProto.FLOAT)
    subnormal = is_subnormal(original)
    assert count == subnormal.sum() and flushed.shape == original.shape and flushed.dtype == np.float32
    assert flushed[~subnormal].tobytes() == original[~subnormal].tobytes()  # NaN and inf too, bit for bit
    assert (flushed[subnormal] == 0).all()
    np.testing.assert_array_equal(np.signbit(flushed[subnormal]), np.signbit(original[subnormal]))
    if not count:
        assert flushed is array


def test_external_data_model_is_flushed_and_the_input_file_untouched(tmp_path):
    from onnxopt.modelio import load_model, save_model

    model = model_with_weights(subnormals=True, width=256)  # w1 and w2 above the external-data threshold
    expected = run(model, feeds(True))
    path = tmp_path / "in.onnx"
    save_model(model, path, external=True)
    before = (tmp_path / "in.onnx.data").read_bytes()
    loaded = load_model(path)
    assert is_external(loaded.graph.initializer[0])
    result = FlushSubnormals()(loaded)
    assert result.stats["values_flushed"] == 12
    assert (tmp_path / "in.onnx.data").read_bytes() == before
    w1 = result.model.graph.initializer[0]
    assert is_external(w1) and not is_subnormal(tensor_to_array(w1)).any()
    out = tmp_path / "out.onnx"
    save_model(result.model, out, external=True)
    for got in (run(str(out), feeds(True)), run(result.model, feeds(True))):  # from the file and in memory
        for x, y in zip(expected, got, strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-30)


def test_cleanup_preset_runs_it_from_the_api():
    model = model_with_weights(subnormals=True)
    result = optimize(model, "cleanup", data=feeds_for(model, count=2) | {"cond": np.ones(2, bool)})
    step = next(s for s in result.report.steps if s.name == "flush-subnormals")
    assert step.stats["values_flushed"] == 12 and step.exact and result.report.failure is None


def test_from_the_cli_with_a_report(tmp_path):
    import json

    from click.testing import CliRunner

    from onnxopt.cli import main

    model = model_with_weights(subnormals=True)
    path, out, report, data = (tmp_path / name for name in ("in.onnx", "out.onnx", "r.json", "feeds.npz"))
    onnx.save(model, path)
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    np.savez(data, x=x, cond=np.array([True, False]))
    result = CliRunner().invoke(main, ["optimize", str(path), "-o", str(out), "-p", "flush-subnormals",
                                       "--data", str(data), "--report", str(report)])
    assert result.exit_code == 0, result.output
    step = json.loads(report.read_text())["steps"][0]
    assert step["exact"] and step["stats"] == {"tensors_flushed": 3, "values_flushed": 12}
    assert not any(is_subnormal(a).any() for a in all_weights(onnx.load(out)).values())
    assert path.read_bytes() == model.SerializeToString()


@pytest.mark.slow
def test_digits_mlp_cleanup_flushes_its_291_subnormals(shared_models):
    folder = shared_models / "digits_mlp"
    model = onnx.load(folder / "model.onnx")
    assert sum(is_subnormal(a).sum() for a in all_weights(model).values()) == 291
    result = optimize(model, "cleanup", data=folder / "eval.npz")
    step = next(s for s in result.report.steps if s.name == "flush-subnormals")
    assert step.stats["values_flushed"] == 291 and result.report.failure is None
    assert not any(is_subnormal(a).any() for a in all_weights(result.model).values())
    for feed in itertools.islice(load_feeds(folder / "eval.npz"), 16):
        for x, y in zip(run(model, feed), run(result.model, feed), strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-30)
