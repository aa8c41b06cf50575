"""The CLI end to end with CliRunner: exit codes 0/1/2, messages, nothing written on failure."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxopt
from onnxopt import registry
from onnxopt.cli import main
from onnxopt.graph import WeightStore
from onnxopt.passes.base import Pass, PassResult

from conftest import mlp


class _ScaleWeights(Pass):
    """Claims to be exact but changes the outputs: what the manager's gate must catch."""

    name = "scale-weights-test"
    summary = "multiply w2 by 1.01 (a deliberately wrong 'exact' pass)"
    exact = True

    def run(self, model):
        store = WeightStore(model.graph)
        store.set_array("w2", store.array("w2") * 1.01)
        return PassResult(model, True, {"weights_scaled": 1})


class _Crash(Pass):
    name = "crash-test"
    summary = "raises, like a pass with a bug"

    def run(self, model):
        raise RuntimeError("boom")


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "in.onnx"
    onnxopt.save_model(mlp(with_dead_branch=True), path)
    return path


@pytest.fixture
def broken_passes(monkeypatch):
    monkeypatch.setitem(registry.PASSES, _ScaleWeights.name, _ScaleWeights)
    monkeypatch.setitem(registry.PASSES, _Crash.name, _Crash)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_optimize_writes_output_and_report(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("optimize", model_path, "-o", out, "-p", "dce", "--report", report)
    assert result.exit_code == 0, result.output
    assert "verdict: PASSED" in result.output and f"wrote {out}" in result.output
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["pipeline"] == "dce"
    step = doc["steps"][0]
    assert step["stats"]["nodes_removed"] == 2
    assert (step["before"]["nodes"], step["after"]["nodes"]) == (6, 4)
    assert step["checks"] == {"checker": "ok", "interface": "ok"}
    assert step["vs_previous"]["outputs"]["y"]["max_abs"] == 0.0
    assert doc["feeds"]["notes"][0].startswith("random feeds")
    assert len(onnx.load(str(out)).graph.node) == 4


def test_python_module_entry_and_api_agree(model_path):
    result = onnxopt.optimize(model_path, "dce,lift-constants")
    assert result.report.passed and len(result.model.graph.node) == 4
    assert len(onnx.load(str(model_path)).graph.node) == 6  # input untouched


def test_api_does_not_modify_the_callers_model():
    model = mlp(with_dead_branch=True)
    before = model.SerializeToString()
    result = onnxopt.optimize(model, "dce")
    assert model.SerializeToString() == before and len(result.model.graph.node) == 4


def test_validation_failure_exits_1_writes_nothing_and_leaves_a_reproducer(model_path, tmp_path, broken_passes):
    out, repro = tmp_path / "out.onnx", tmp_path / "repro"
    data = tmp_path / "feeds.npz"
    np.savez(data, x=np.ones((3, 1, 8), np.float32))
    before = model_path.read_bytes()
    result = invoke("optimize", model_path, "-o", out, "-p", "dce,scale-weights-test", "--data", data,
                    "--repro-dir", repro)
    assert result.exit_code == 1
    assert "step 2 'scale-weights-test': not exact" in result.output
    assert not out.exists() and model_path.read_bytes() == before
    assert (repro / "pipeline.txt").read_text().strip() == "scale-weights-test"
    command = (repro / "command.sh").read_text()
    assert "onnxopt optimize model.onnx" in command and "--data feeds.npz" in command
    assert len(onnx.load(str(repro / "model.onnx")).graph.node) == 4  # the model before the failing step
    np.testing.assert_array_equal(np.load(repro / "feeds.npz")["x"], np.ones((3, 1, 8), np.float32))


def test_keep_failed_writes_the_output_anyway(model_path, tmp_path, broken_passes):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", model_path, "-o", out, "-p", "scale-weights-test", "--keep-failed",
                    "--repro-dir", tmp_path / "r")
    assert result.exit_code == 1 and out.exists()


def test_lossy_thresholds_gate(model_path, tmp_path, monkeypatch, broken_passes):
    monkeypatch.setattr(_ScaleWeights, "exact", False)
    ok = invoke("optimize", model_path, "-p", "scale-weights-test", "--min-cosine", "0.99")
    assert ok.exit_code == 0, ok.output
    strict = invoke("optimize", model_path, "-p", "scale-weights-test", "--max-abs", "1e-6", "--repro-dir",
                    tmp_path / "r")
    assert strict.exit_code == 1 and "max abs" in strict.output


def test_a_crashing_pass_exits_1_with_one_line(model_path, tmp_path, broken_passes):
    result = invoke("optimize", model_path, "-o", tmp_path / "o.onnx", "-p", "crash-test", "--repro-dir",
                    tmp_path / "r")
    assert result.exit_code == 1
    assert "step 1 'crash-test' crashed: RuntimeError: boom" in result.output
    assert "Traceback" not in result.output and (tmp_path / "r" / "traceback.txt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "dcee"], "unknown pass 'dcee' (did you mean 'dce'?)"),
        (["-p", "dce(level=2)"], "has no option 'level'"),
        (["-p", "dce", "--data", "missing.npz"], "data file not found"),
        (["-p", "dce", "-o", "no/such/folder/out.onnx"], "output folder does not exist"),
        (["-p", "dce", "--input-shape", "x=a"], "expected NAME=D1,D2"),
        (["-p", "dce", "-o", "."], "is a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_path, args, message):
    result = invoke("optimize", model_path, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_output_equal_to_input_needs_a_flag(model_path):
    before = model_path.read_bytes()
    refused = invoke("optimize", model_path, "-o", model_path, "-p", "dce")
    assert refused.exit_code == 2 and "is the input file" in refused.output
    assert model_path.read_bytes() == before
    allowed = invoke("optimize", model_path, "-o", model_path, "-p", "dce", "--overwrite-input")
    assert allowed.exit_code == 0 and len(onnx.load(str(model_path)).graph.node) == 4


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_bad_model_files_exit_2(tmp_path, content):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    for args in (["info", path], ["optimize", path, "-p", "dce"], ["compare", path, path]):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output


def test_data_with_wrong_dtype_exits_2(model_path, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 1, 8), np.float64))
    result = invoke("optimize", model_path, "-p", "dce", "--data", data)
    assert result.exit_code == 2 and "is float64, the model wants float32" in result.output


def test_debug_shows_the_traceback(model_path):
    result = CliRunner().invoke(main, ["--debug", "optimize", str(model_path), "-p", "dcee"])
    assert result.exit_code == 2 and "Traceback" in result.output


def test_unknown_command_or_missing_option_is_a_usage_error(model_path):
    assert invoke("optimise", model_path).exit_code == 2
    assert invoke("optimize", model_path).exit_code == 2  # -p is required


def test_passes_lists_every_registered_pass_with_options():
    result = invoke("passes", "--json")
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(rows) == set(registry.PASSES)
    assert rows["dce"]["exact"] is True
    assert "dce" in invoke("passes").output


def test_info_reports_structure(model_path):
    result = invoke("info", model_path, "--json")
    doc = json.loads(result.output)
    assert doc["ops"] == {"MatMul": 2, "Add": 1, "Gemm": 1, "Relu": 1, "Sigmoid": 1}
    assert doc["params"] == 16 * 8 + 16 + 16 * 4 + 4 + 16 * 3
    assert doc["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", 8]}]
    assert "params" in invoke("info", model_path).output


def test_compare_reports_metrics_and_gates(model_path, tmp_path):
    other = tmp_path / "other.onnx"
    onnxopt.save_model(mlp(seed=5), other)
    same = invoke("compare", model_path, model_path, "--min-cosine", "0.9999", "--report", tmp_path / "c.json")
    assert same.exit_code == 0 and "verdict: PASSED" in same.output
    assert json.loads((tmp_path / "c.json").read_text())["outputs"]["y"]["max_abs"] == 0.0
    different = invoke("compare", model_path, other, "--min-cosine", "0.9999")
    assert different.exit_code == 1 and "cosine" in different.output


class _NegateWeights(_ScaleWeights):
    name = "negate-test"
    exact = False

    def run(self, model):
        store = WeightStore(model.graph)
        store.set_array("w2", -store.array("w2"))
        return PassResult(model, True, {})


def test_labels_add_accuracy_and_gate_its_drop(model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.PASSES, _NegateWeights.name, _NegateWeights)
    data, labels = tmp_path / "d.npz", tmp_path / "l.npz"
    x = np.random.default_rng(0).standard_normal((20, 1, 8)).astype(np.float32)
    np.savez(data, x=x)
    predicted = [int(np.argmax(y)) for y in onnxopt.api.run_model(mlp(), [{"x": s} for s in x])["y"]]
    np.savez(labels, labels=np.array(predicted))
    ok = invoke("optimize", model_path, "-p", "dce", "--data", data, "--labels", labels, "--report", tmp_path / "r.json")
    assert ok.exit_code == 0 and "original accuracy 100.00%" in ok.output
    assert json.loads((tmp_path / "r.json").read_text())["steps"][0]["accuracy"] == 1.0
    dropped = invoke("optimize", model_path, "-p", "negate-test", "--data", data, "--labels", labels,
                     "--max-accuracy-drop", "1", "--repro-dir", tmp_path / "r")
    assert dropped.exit_code == 1 and "points below the original's 100.00%" in dropped.output
    wrong_count = tmp_path / "w.npz"
    np.savez(wrong_count, labels=np.zeros(3, np.int64))
    refused = invoke("optimize", model_path, "-p", "dce", "--data", data, "--labels", wrong_count)
    assert refused.exit_code == 2 and "expected 20 integer class labels" in refused.output
