"""The lossy passes from the command line, on the committed samples: success, gates and bad input."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxopt.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sample(name: str, kind: str) -> Path:
    return SAMPLES / (f"{name}.onnx" if kind == "model" else f"{name}.{kind}.npz")


def test_quantize_from_the_cli_keeps_accuracy_and_shrinks_the_file(tmp_path):
    out, report = tmp_path / "mlp.int8.onnx", tmp_path / "r.json"
    result = invoke("optimize", sample("mlp", "model"), "-o", out, "-p", "quantize", "--calib", sample("mlp", "calib"),
                    "--data", sample("mlp", "eval"), "--labels", sample("mlp", "labels"),
                    "--max-accuracy-drop", "0.5", "--report", report)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["steps"][0]["accuracy"] >= doc["feeds"]["accuracy"] - 0.005
    assert out.stat().st_size < 0.35 * sample("mlp", "model").stat().st_size
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    dynamic = doc["steps"][0]["stats"]["mode_dynamic"]  # auto mode measured both forms and kept one
    assert ({"DynamicQuantizeLinear", "MatMulInteger"} if dynamic else {"QuantizeLinear", "DequantizeLinear"}) <= ops
    layers = [row for row in doc["steps"][0]["details"]["layers"] if "mode" in row]  # activation ranges aside
    assert [row["mode"] for row in layers] == ["dynamic" if dynamic else "static"] * 3


def test_prune_neurons_then_zero_rows_shrinks_parameters(tmp_path):
    report = tmp_path / "r.json"
    result = invoke("optimize", sample("mlp", "model"), "-p", "prune-neurons(ratio=0.5),zero-rows,dce",
                    "--data", sample("mlp", "eval"), "--report", report, "--min-cosine", "0")  # a lossy ratio
    assert result.exit_code == 0, result.output
    steps = json.loads(report.read_text())["steps"]
    assert steps[1]["name"] == "zero-rows" and steps[1]["exact"]
    assert steps[1]["after"]["params"] < 0.6 * steps[0]["before"]["params"]
    # zero-rows and dce are validated together, against prune-neurons' outputs: the removal itself is exact
    assert steps[1]["checks"]["onnxruntime"] == "validated with step 3" and steps[1]["vs_previous"] is None
    assert steps[2]["vs_previous"]["passed"]


@pytest.mark.parametrize("pipeline", ["quantize", "prune(method=wanda)", "prune-neurons(method=wanda)",
                                      "prune-neurons(method=fluctuation)"])
def test_calibrating_passes_without_calibration_data_exit_2(pipeline, tmp_path):
    out = tmp_path / "o.onnx"
    result = invoke("optimize", sample("mlp", "model"), "-o", out, "-p", pipeline)
    assert result.exit_code == 2 and "needs calibration data" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 1, 64), np.float64)}, "is float64, the model wants float32"),
        ({"y": np.zeros((4, 1, 64), np.float32)}, "no array for model input 'x'"),
        ({"x": np.zeros((4, 64), np.float32)}, "rank 1"),
        ({"x": np.full((4, 1, 64), np.inf, np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 1, 64), np.float32)}, "no samples"),
    ],
)
def test_calibration_data_that_does_not_match_exits_2(arrays, message, tmp_path):
    calib, out = tmp_path / "c.npz", tmp_path / "o.onnx"
    np.savez(calib, **arrays)
    result = invoke("optimize", sample("mlp", "model"), "-o", out, "-p", "quantize", "--calib", calib)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("prune(sparsity=1.0)", "sparsity must be in [0, 1)"),
        ("prune(sparsity=-0.1)", "sparsity must be in [0, 1)"),
        ("prune(method=random)", "method"),
        ("quantize(method=best)", "method"),
        ("prune-neurons(ratio=2)", "ratio"),
    ],
)
def test_bad_pass_options_exit_2(pipeline, message):
    result = invoke("optimize", sample("mlp", "model"), "-p", pipeline)
    assert result.exit_code == 2 and message in result.output and "pipeline column" in result.output
