"""Sharp edges found by using onnxopt as a new user would: each bullet of issue 8, item 6, with a test."""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxopt
from onnxopt.cli import main
from onnxopt.data import random_feeds
from onnxopt.errors import InputError
from onnxopt.passes.dce import DeadCodeElimination
from onnxopt.passes.fold_constants import GROWTH_ALLOWANCE, FoldConstants
from onnxopt.report import size_summary
from onnxopt.synthetic import integer_bounds, synthetic_reference
from onnxopt.validate import run_model

from conftest import make_model, mlp, tensor, value
from test_cli import _ScaleWeights, broken_passes, model_path  # noqa: F401 (fixtures)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- dce and graph outputs


def _initializer_output_model() -> onnx.ModelProto:
    """``return x, W, y``: a graph input and an initializer among the graph outputs."""
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2, 2])],
                      [value("x", [2, 2]), value("W", [2, 2]), value("y", [2, 2])],
                      [tensor("W", np.arange(4, dtype=np.float32).reshape(2, 2))])


def test_dce_keeps_an_initializer_that_is_a_graph_output():
    result = DeadCodeElimination()(_initializer_output_model())
    assert [o.name for o in result.model.graph.output] == ["x", "W", "y"]
    assert [t.name for t in result.model.graph.initializer] == ["W"]


def test_the_interface_check_passes_an_initializer_output():
    result = onnxopt.optimize(_initializer_output_model(), "dce,cleanup")
    assert result.report.passed, result.report.failure
    assert [o.name for o in result.model.graph.output] == ["x", "W", "y"]


# --------------------------------------------------------------------------- synthetic feeds


def _encoder() -> onnx.ModelProto:
    """A BERT-style embedding: token ids into a 30-row table, token-type ids (cast) into a one-row one (RoBERTa's)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["w"]),
        helper.make_node("Cast", ["token_type_ids"], ["tt64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["types", "tt64"], ["t"]),
        helper.make_node("Add", ["w", "t"], ["y"]),
    ]
    return make_model(nodes, [value("input_ids", ["batch", "seq"], TensorProto.INT64),
                              value("token_type_ids", ["batch", "seq"], TensorProto.INT32)],
                      [value("y", ["batch", "seq", 4])],
                      [tensor("word", rng.standard_normal((30, 4)).astype(np.float32)),
                       tensor("types", rng.standard_normal((1, 4)).astype(np.float32))])


def test_integer_inputs_that_index_a_table_stay_below_its_size():
    model = _encoder()
    assert integer_bounds(model) == {"input_ids": (0, 30), "token_type_ids": (0, 1)}
    feeds, notes, _ = synthetic_reference(model)
    assert feeds.arrays["token_type_ids"].max() == 0 and feeds.arrays["token_type_ids"].dtype == np.int32
    assert feeds.arrays["input_ids"].max() > 1  # ids spread over the vocabulary, not only 0 and 1
    assert any("token_type_ids': integers in [0, 1)" in n for n in notes)
    assert onnxopt.optimize(model, "dce,cleanup").report.passed


def test_plain_random_integers_overrun_the_small_table():
    """The negative twin: without the graph's bounds the same model cannot run on random ids."""
    feeds, _ = random_feeds(_encoder(), input_shapes={"input_ids": (1, 16), "token_type_ids": (1, 16)})
    with pytest.raises(InputError, match="indices"):
        run_model(_encoder(), feeds)


def test_an_integer_compared_with_a_constant_takes_that_constant():
    """A sample rate picks an If branch; the other branch cannot run (a reshape to 7 of 8 values)."""
    then_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["a"])], "then", [],
                                    [value("a", ["n"])])
    else_branch = helper.make_graph([helper.make_node("Reshape", ["x", "bad_shape"], ["b"])], "else", [],
                                    [value("b", ["n"])], [tensor("bad_shape", np.array([7], np.int64))])
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
             helper.make_node("If", ["is_16k"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [value("x", [8]), value("sr", [], TensorProto.INT64)], [value("y", ["n"])],
                       [tensor("rate", np.array(16000, np.int64))])
    assert integer_bounds(model) == {"sr": (16000, 16001)}
    result = onnxopt.optimize(model, "dce")
    assert result.report.passed, result.report.failure


def test_an_attention_mask_gets_zeros_and_ones():
    """HF-style extended mask (1 - mask) * float.min: a 6 in the mask overflows to inf, softmax to NaN."""
    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "m"], ["inverted"]),
             helper.make_node("Mul", ["inverted", "lowest"], ["bias"]),
             helper.make_node("Add", ["scores", "bias"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    model = make_model(nodes, [value("scores", ["batch", "seq"]),
                               value("attention_mask", ["batch", "seq"], TensorProto.INT64)],
                       [value("y", ["batch", "seq"])],
                       [tensor("one", np.array(1, np.float32)),
                        tensor("lowest", np.array(np.finfo(np.float32).min, np.float32))])
    feeds, notes, outputs = synthetic_reference(model)
    assert set(np.unique(feeds.arrays["attention_mask"])) <= {0, 1}
    assert all(np.isfinite(y).all() for y in outputs["y"]) and not any("NaN" in n for n in notes)


def test_random_feeds_that_give_nan_are_named_in_the_report():
    model = make_model([helper.make_node("Sqrt", ["x"], ["y"])], [value("x", [4])], [value("y", [4])])
    report = onnxopt.optimize(model, "dce").report
    assert report.passed and any("NaN or Inf" in n and "--data" in n for n in report.feeds["notes"])
    assert "verdict: PASSED" in report.table()


def _convs(shape) -> onnx.ModelProto:
    """Two 3x3 convolutions without padding: needs spatial dims of at least 5."""
    w = tensor("w", np.ones((1, 1, 3, 3), np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Conv", ["h", "w"], ["y"])]
    return make_model(nodes, [value("x", shape)], [value("y", ["n", 1, "h", "w"])], [w])


def test_symbolic_spatial_dims_grow_until_the_model_runs():
    feeds, notes, _ = synthetic_reference(_convs(["n", 1, "height", "width"]))
    assert feeds.arrays["x"].shape[1:] == (1, 1, 64, 64)
    assert "symbolic dims taken as n=1, height=64, width=64" in "; ".join(notes)


def test_a_detector_neck_gets_spatial_dims_its_downsampling_can_take():
    """YOLO-style: two stride-2 convs, upsample x2, concat with the stride-2 map; at 1x1 the shapes do not meet."""
    w = tensor("w", np.full((1, 1, 3, 3), 0.1, np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["p1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p1", "w"], ["p2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["p2", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Concat", ["up", "p1"], ["y"], axis=1)]
    model = make_model(nodes, [value("x", ["batch", 1, "height", "width"])],
                       [value("y", ["batch", 2, "h2", "w2"])],
                       [w, tensor("scales", np.array([1, 1, 2, 2], np.float32))])
    with pytest.raises(InputError):
        run_model(model, random_feeds(model)[0])
    result = onnxopt.optimize(model, "dce,cleanup")
    assert result.report.passed, result.report.failure
    assert "height=64, width=64" in "; ".join(result.report.feeds["notes"])


def test_feeds_that_never_run_say_how_to_fix_it(tmp_path):
    """A fixed 3x3 input is too small whatever the symbolic dims: the error names --data and --input-shape."""
    path = tmp_path / "m.onnx"
    onnx.save(_convs([1, 1, 3, 3]), path)
    result = invoke("optimize", path, "-p", "dce")
    assert result.exit_code == 2
    assert "random feeds are not valid inputs for this model" in result.output
    assert "--data" in result.output and "--input-shape NAME=D1,D2" in result.output
    assert "the input model:" not in result.output
    onnx.save(_convs([1, 1, "h", "w"]), path)
    assert invoke("optimize", path, "-p", "dce", "--input-shape", "x=1,1,9,9").exit_code == 0


def test_a_zero_size_dimension_is_honoured():
    model = make_model([helper.make_node("Relu", ["e"], ["y"])], [value("e", [0, 3])], [value("y", [0, 3])])
    feeds, _ = random_feeds(model)
    assert feeds.arrays["e"].shape == (4, 0, 3)
    assert onnxopt.optimize(model, "dce,cleanup").report.passed


def test_calib_without_data_validates_on_the_calibration_samples(model_path, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((6, 1, 8)).astype(np.float32))
    result = onnxopt.optimize(model_path, "dce", calib=str(calib))
    assert result.report.feeds["samples"] == 6
    assert result.report.feeds["origin"] == f"--calib {calib}, as no --data was given"
    assert onnxopt.optimize(model_path, "dce").report.feeds["origin"] == "random"


# --------------------------------------------------------------------------- options refused up front


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "nosuch=1,8"], "no input 'nosuch' (its inputs: x)"),
    (["--input-shape", "x=1,2,8"], "3 dims given, the model's input has rank 2"),
    (["--input-shape", "x=1,9"], "axis 1 is fixed at 8"),
    (["--max-accuracy-drop", "1"], "--max-accuracy-drop needs --labels"),
    (["--min-cosine", "2"], "--min-cosine must be between -1 and 1, not 2"),
    (["--max-abs", "-1"], "--max-abs must be at least 0"),
    (["--report", "no/such/folder/r.json"], "--report: output folder does not exist"),
    (["--calib-cache", "no/such/folder/c.npz"], "--calib-cache: folder does not exist"),
])
def test_bad_options_exit_2_before_any_work(model_path, tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("optimize", model_path, "-p", "dce", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "verdict" not in result.output


def test_reasonable_gates_are_accepted(model_path):
    assert invoke("optimize", model_path, "-p", "dce", "--min-cosine", "0.5", "--max-abs", "0").exit_code == 0


def test_a_model_that_fails_the_full_checker_is_the_inputs_fault(tmp_path):
    """Shape inference finds [2,3] + [4,5] impossible: the input is blamed, not step 1."""
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])], [value("a", [2, 3]), value("b", [4, 5])],
                       [value("y", [2, 3])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = invoke("optimize", path, "-p", "dce")
    assert result.exit_code == 2
    assert "the input model fails the ONNX checker" in result.output and "step 1" not in result.output


# --------------------------------------------------------------------------- written files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_respect_the_umask(model_path, tmp_path, umask_022):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("optimize", model_path, "-p", "dce", "-o", out, "--report", report, "--external-data")
    assert result.exit_code == 0, result.output
    for path in (out, tmp_path / "out.onnx.data", report):
        assert _mode(path) == 0o644, path


def test_overwrite_input_keeps_the_inputs_mode(model_path, umask_022):
    model_path.chmod(0o640)
    result = invoke("optimize", model_path, "-p", "dce", "-o", model_path, "--overwrite-input")
    assert result.exit_code == 0, result.output
    assert _mode(model_path) == 0o640


# --------------------------------------------------------------------------- failures and reproducers


def test_quiet_failure_prints_the_reason(model_path, tmp_path, broken_passes):
    result = invoke("optimize", model_path, "-p", "scale-weights-test", "-q", "--repro-dir", tmp_path / "r")
    assert result.exit_code == 1
    assert "verdict: FAILED: step 1 'scale-weights-test': not exact" in result.output
    assert f"reproducer: {tmp_path / 'r'}" in result.output


def test_the_reproducer_replays_with_the_gates_that_failed(model_path, tmp_path, broken_passes, monkeypatch):
    monkeypatch.setattr(_ScaleWeights, "exact", False)
    repro = tmp_path / "r"
    failed = invoke("optimize", model_path, "-p", "dce,scale-weights-test", "--max-abs", "1e-6",
                    "--repro-dir", repro)
    assert failed.exit_code == 1 and "max abs" in failed.output
    command = shlex.split((repro / "command.sh").read_text().splitlines()[-1])
    assert command[:2] == ["onnxopt", "optimize"] and "--max-abs" in command
    monkeypatch.chdir(repro)
    replayed = CliRunner().invoke(main, command[1:] + ["--repro-dir", str(tmp_path / "r2")])
    assert replayed.exit_code == 1 and "max abs" in replayed.output, replayed.output


def test_the_api_leaves_reproducers_in_a_temporary_folder(tmp_path, monkeypatch, broken_passes):
    monkeypatch.chdir(tmp_path)
    result = onnxopt.optimize(mlp(), "scale-weights-test")
    assert not result.report.passed and result.report.reproducer
    where = Path(result.report.reproducer)
    assert where.parent == Path(tempfile.gettempdir()) and (where / "command.sh").is_file()
    assert not list(tmp_path.iterdir())


def test_optimize_without_output_says_nothing_is_written(model_path):
    result = invoke("optimize", model_path, "-p", "dce")
    assert result.exit_code == 0 and "nothing written: no -o/--output given" in result.output


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_works_before_and_after_the_subcommand(model_path, position):
    args = ["optimize", str(model_path), "-p", "dcee"]
    args = ["--debug", *args] if position == "before" else [*args, "--debug"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" in result.output
    assert "Traceback" not in invoke("optimize", model_path, "-p", "dcee").output


# --------------------------------------------------------------------------- fold-constants pays for itself


def _transposed_weight(shared: bool, rows: int = 64) -> onnx.ModelProto:
    """x @ W^T, and (when shared) x @ W too: folding the Transpose keeps W and adds W^T."""
    w = tensor("W", np.random.default_rng(0).standard_normal((rows, rows)).astype(np.float32))
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"]), helper.make_node("MatMul", ["x", "Wt"], ["y"])]
    outputs = [value("y", ["n", rows])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["z"]))
        outputs.append(value("z", ["n", rows]))
    return make_model(nodes, [value("x", ["n", rows])], outputs, [w])


def test_fold_declines_a_copy_of_a_weight_that_stays_referenced():
    model = _transposed_weight(shared=True)
    before = size_summary(model)["weight_bytes"]
    result = FoldConstants()(model)
    assert result.stats["skipped_grows_weights"] == 1 and not result.modified
    assert size_summary(result.model)["weight_bytes"] == before


def test_fold_still_folds_what_frees_its_input():
    result = FoldConstants()(_transposed_weight(shared=False))
    assert result.stats["nodes_folded"] == 1 and "skipped_grows_weights" not in result.stats
    assert [n.op_type for n in result.model.graph.node] == ["MatMul"]


def test_fold_declines_expanding_a_shape_into_a_big_tensor():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=tensor("v", np.ones(1, np.float32))),
             helper.make_node("Add", ["x", "ones"], ["y"])]
    model = make_model(nodes, [value("x", [64, 64])], [value("y", [64, 64])],
                       [tensor("shape", np.array([64, 64], np.int64))])
    result = FoldConstants()(model)
    assert result.stats.get("skipped_grows_weights") == 1 and not result.modified


@settings(max_examples=25, deadline=None)
@given(shared=st.lists(st.booleans(), min_size=1, max_size=4), rows=st.sampled_from([4, 32, 64]),
       op=st.sampled_from(["Transpose", "Neg", "Tile"]))
def test_fold_never_grows_weight_bytes_beyond_the_allowance(shared, rows, op):
    """Weights, each read by a foldable op and (maybe) directly too: folding adds at most the allowance each."""
    nodes, inits, outputs = [], [], []
    rng = np.random.default_rng(rows)
    for k, keep in enumerate(shared):
        inits.append(tensor(f"W{k}", rng.standard_normal((rows, rows)).astype(np.float32)))
        extra = [f"reps{k}"] if op == "Tile" else []
        if op == "Tile":
            inits.append(tensor(f"reps{k}", np.array([1, 2], np.int64)))
        nodes += [helper.make_node(op, [f"W{k}", *extra], [f"F{k}"]),
                  helper.make_node("ReduceSum", [f"F{k}"], [f"s{k}"], keepdims=0)]
        outputs.append(value(f"s{k}", None))
        if keep:
            nodes.append(helper.make_node("MatMul", ["x", f"W{k}"], [f"m{k}"]))
            outputs.append(value(f"m{k}", None))
    model = make_model(nodes, [value("x", [1, rows])], outputs, inits)
    before = size_summary(model)["weight_bytes"]
    result = FoldConstants()(model)
    assert size_summary(result.model)["weight_bytes"] <= before + GROWTH_ALLOWANCE * len(shared)
    feeds = random_feeds(model, count=1)[0]
    expected, got = run_model(model, feeds), run_model(result.model, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name][0], expected[name][0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "ppocr_cls", "minilm_l3"])
def test_shared_models_clean_up_without_data_and_never_grow(shared_models, name):
    """As a new user runs it: no --data; synthetic feeds must be valid (MiniLM's token ids stay in its vocabulary)."""
    report = onnxopt.optimize(shared_models / name / "model.onnx", "cleanup").report
    assert report.passed, report.failure
    assert report.steps[-1].after["weight_bytes"] <= report.steps[0].before["weight_bytes"]


def test_input_shape_may_set_a_dim_exported_as_minus_one():
    """paddle2onnx writes dynamic dims as -1: --input-shape may set them, and fixed dims must match."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [-1, 3])], [value("y", [-1, 3])])
    feeds, _ = random_feeds(model, input_shapes={"x": (5, 3)})
    assert feeds.arrays["x"].shape == (4, 5, 3)
    with pytest.raises(InputError, match="axis 1 is fixed at 3"):
        random_feeds(model, input_shapes={"x": (5, 4)})
