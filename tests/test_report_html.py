"""The HTML report: contents from the JSON form, plots, the page without matplotlib, per-layer data, a browser."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxopt
from onnxopt import api
from onnxopt.cli import main
from onnxopt.data import FeedSet
from onnxopt.modelio import copy_model
from onnxopt.passes.base import PassContext
from onnxopt.passes.quantize import QuantizeOptions, QuantizePass
from onnxopt.graph import WeightStore
from onnxopt.report import layer_table, layer_weights, report_warnings
from onnxopt.report_html import INSTALL_HINT, render_html
from onnxopt.validate import Session

from conftest import make_model, mlp, tensor, value

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PIPELINE = "prune(sparsity=0.5),zero-rows,quantize(min_cosine=0.9999,mode=static)"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The README's sample pipeline on samples/mlp with labels: report JSON and page, written by the CLI."""
    folder = tmp_path_factory.mktemp("report")
    result = invoke("optimize", SAMPLES / "mlp.onnx", "-o", folder / "out.onnx", "-p", PIPELINE,
                    "--data", SAMPLES / "mlp.eval.npz", "--labels", SAMPLES / "mlp.labels.npz",
                    "--calib", SAMPLES / "mlp.calib.npz", "--max-accuracy-drop", 100, "--report", folder / "r.json",
                    "--report-html", folder / "r.html", "--bench", "--bench-runs", 5)
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_page_holds_the_pipeline_the_step_rows_and_the_plots(sample_run):
    folder, _ = sample_run
    page = (folder / "r.html").read_text()
    document = json.loads((folder / "r.json").read_text())
    assert page.startswith("<!DOCTYPE html>") and "PASSED" in page
    steps = document["steps"]
    assert [s["name"] for s in steps] == ["prune", "zero-rows", "quantize"]
    for step in steps:  # one chip in the pipeline, one row in the table, one section for per-step details
        assert page.count(f"<b>{step['name']}</b></code>") == 2
    assert 'id="step-3"' in page and "cosine alone" in page  # quantize's sensitivity ranking
    labels = re.findall(r'<figure class="plot" role="img" aria-label="([^"]+)"', page)
    assert "per-step cosine, accuracy, weights and nodes" in labels and "latency per model" in labels
    assert "weight sparsity per layer" in labels and "sensitivity: cosine alone" in labels
    assert page.count("<svg") == len(labels)
    assert f"{document['feeds']['accuracy']:.2%}" in page
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)  # opens offline


def test_rendering_the_json_again_gives_the_same_page(sample_run, tmp_path):
    folder, _ = sample_run
    result = invoke("report", folder / "r.json", "-o", tmp_path / "again.html")
    assert result.exit_code == 0 and "wrote" in result.output
    assert (tmp_path / "again.html").read_text() == (folder / "r.html").read_text()


def test_report_json_records_layers_latency_and_sensitivity(sample_run):
    folder, output = sample_run
    document = json.loads((folder / "r.json").read_text())
    layers = {row["name"]: row for row in document["layers"]}
    assert len(layers) == 3 and all(row["sparsity_before"] == 0 for row in layers.values())
    assert all(0.45 <= row["sparsity"] <= 0.55 for row in layers.values())  # prune(sparsity=0.5) per layer
    assert all(0.1 < row["weight_change"] < 0.5 for row in layers.values())  # pruned half of the smallest
    ranking = document["steps"][2]["details"]["sensitivity"]
    assert [r["cosine_alone"] for r in ranking] == sorted(r["cosine_alone"] for r in ranking)
    kept = {k.split(":", 1)[1] for k in document["steps"][2]["stats"] if k.startswith("kept_float:")}
    assert {r["name"] for r in ranking if r["kept_float"]} == kept
    assert all(layers[name]["dtype"] == ("float" if name in kept else "int8") for name in layers)
    latency = document["latency"]
    assert [m["label"] for m in latency["models"]] == ["original", "result"] and latency["runs"] == 5
    assert "latency: original" in output


def test_layer_table_quantization_error_and_untouched_layers():
    model = mlp(hidden=32)
    feeds = FeedSet({"x": np.random.default_rng(0).standard_normal((16, 2, 8)).astype(np.float32)}, "calib")
    quantized = QuantizePass(QuantizeOptions(mode="static"), PassContext(calib=feeds))(copy_model(model)).model
    rows = layer_table(quantized, model)
    assert [r["dtype"] for r in rows] == ["int8", "int8"]
    assert all(0 < r["weight_change"] < 0.02 for r in rows)  # int8 per-channel: about 0.5 % of the weight norm
    same = layer_table(model, model)
    assert [r["weight_change"] for r in same] == [0.0, 0.0] and [r["name"] for r in same] == ["fc1", "fc2"]
    assert all("weight_change" not in r for r in layer_table(model))


def test_details_render_generically():
    document = {
        "pipeline": "x", "steps": [_step(1, "some-pass", details={
            "layers": [{"name": "conv1", "sparsity": 0.25, "error": 0.01, "kind": "a"},
                       {"name": "conv2", "sparsity": 0.75, "error": None, "kind": "b"}],
            "loss_curves": {"conv1": [4.0, 2.0, 1.0], "conv2": [3.0, 2.5]},
            "history": [1, 2, 3],
            "settings": {"alpha": 0.5},
        })],
    }
    page = render_html(document)
    labels = re.findall(r'aria-label="([^"]+)"', page)
    assert {"layers: sparsity", "layers: error", "loss curves", "history"} <= set(labels)
    assert "layers: kind" not in labels  # text columns are tabled, not plotted
    assert "<td>conv2</td>" in page and "<td>alpha</td><td>0.5</td>" in page


def test_fields_the_page_does_not_know_are_shown():
    step = {**_step(1, "dce"), "gate": {"min_cosine": 0.99}}
    page = render_html({"pipeline": "dce", "steps": [step], "exact_tolerance": {"rtol": 3e-5}})
    assert "<th>exact tolerance</th>" in page and "rtol" in page and "3e-05" in page
    assert 'id="step-1"' in page and "<td>min_cosine</td><td>0.99</td>" in page
    assert 'id="step-1"' not in render_html({"pipeline": "dce", "steps": [_step(1, "dce")]})


def test_page_without_matplotlib_keeps_the_tables_and_says_how_to_get_plots(sample_run, monkeypatch):
    folder, _ = sample_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    page = render_html(json.loads((folder / "r.json").read_text()))
    assert "<svg" not in page and INSTALL_HINT in page
    assert page.count("<b>quantize</b></code>") == 2 and "cosine alone" in page


def test_warnings_for_grown_weights_and_a_slower_result():
    grown = _step(1, "fold-constants", before_bytes=1000, after_bytes=1500)
    shrunk = _step(2, "quantize", before_bytes=1500, after_bytes=400)
    document = {"pipeline": "x", "steps": [grown, shrunk], "latency": _latency(1.30)}
    warnings = report_warnings(document)
    assert len(warnings) == 2 and "'fold-constants' made the weights larger" in warnings[0]
    assert "slower" in warnings[1] and "1.30x" in warnings[1]
    assert "Warnings" in render_html(document)
    calm = {"pipeline": "x", "steps": [shrunk], "latency": _latency(1.01)}
    assert report_warnings(calm) == [] and "Warnings" not in render_html(calm)


def test_cli_report_refusals(sample_run, tmp_path):
    folder, _ = sample_run
    missing = invoke("report", tmp_path / "nope.json", "-o", tmp_path / "a.html")
    assert missing.exit_code == 2 and "not found" in missing.output
    (tmp_path / "bad.json").write_text("{not json")
    assert invoke("report", tmp_path / "bad.json", "-o", tmp_path / "a.html").exit_code == 2
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    other = invoke("report", tmp_path / "other.json", "-o", tmp_path / "a.html")
    assert other.exit_code == 2 and "not an onnxopt report" in other.output
    (tmp_path / "broken.json").write_text(json.dumps({"pipeline": "x", "steps": [{"index": 1}]}))
    assert invoke("report", tmp_path / "broken.json", "-o", tmp_path / "a.html").exit_code == 2
    nowhere = invoke("report", folder / "r.json", "-o", tmp_path / "no" / "a.html")
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output
    assert not (tmp_path / "a.html").exists()


def test_optimize_refuses_an_html_path_in_a_missing_folder_before_running(tmp_path):
    path = tmp_path / "in.onnx"
    onnxopt.save_model(mlp(), path)
    result = invoke("optimize", path, "-p", "dce", "--report-html", tmp_path / "no" / "r.html")
    assert result.exit_code == 2 and "does not exist" in result.output and "verdict" not in result.output


def test_api_writes_the_page(tmp_path):
    result = api.optimize(mlp(), "dce,prune(sparsity=0.2)")
    result.report.write_html(tmp_path / "r.html")
    api.report_html(result.report.to_dict(), tmp_path / "again.html")
    assert (tmp_path / "r.html").read_text() == (tmp_path / "again.html").read_text()
    assert "prune" in (tmp_path / "r.html").read_text()


def _step(index, name, before_bytes=100, after_bytes=100, details=None):
    size = {"nodes": 3, "params": 10}
    return {"index": index, "name": name, "step": name, "options": {}, "exact": True, "seconds": 0.1,
            "modified": True, "before": {**size, "weight_bytes": before_bytes},
            "after": {**size, "weight_bytes": after_bytes}, "stats": {}, "passed": True, "details": details or {}}


def _latency(ratio):
    models = [{"label": label, "file_bytes": 100, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "spread": 0.0,
               "throughput_per_s": 1000 / ms, "peak_memory_bytes": 1 << 20, "vs_first": {"latency": r}}
              for label, ms, r in (("original", 1.0, 1.0), ("result", ratio, ratio))]
    return {"threads": 1, "runs": 5, "feeds": {"origin": "random"}, "onnxruntime": "x", "models": models}


# --------------------------------------------------------------------------- a real browser


@pytest.mark.slow
def test_page_renders_in_headless_chromium(sample_run, tmp_path):
    """Chromium loads the page offline, lays out every plot, and the screenshot shows the plots' colours."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    image = pytest.importorskip("matplotlib.image")
    folder, _ = sample_run
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1200,2600",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", (folder / "r.html").as_uri()], timeout=120, capture_output=True)
    dom = subprocess.run(flags + ["--dump-dom", (folder / "r.html").as_uri()], timeout=120, capture_output=True,
                         text=True).stdout
    page = (folder / "r.html").read_text()
    assert dom.count("<svg") == page.count("<svg") > 0 and "quantize" in dom
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2600, 1200)
    blue = np.all(np.abs(pixels - np.array([0x2F, 0x6F, 0xB2]) / 255) < 0.03, axis=-1)  # bars and lines
    green = np.all(np.abs(pixels - np.array([0x27, 0x86, 0x4A]) / 255) < 0.03, axis=-1)  # the PASSED badge
    assert blue.sum() > 5000 and green.sum() > 200


# --------------------------------------------------------------------------- laws


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(0, 2**31 - 1))
def test_dequantized_layer_weights_equal_onnxruntime_dequantize_linear(rank_extra, axis, per_channel, seed):
    """layer_table reads an int8 weight behind DequantizeLinear as onnxruntime computes it."""
    rng = np.random.default_rng(seed)
    shape = (4, 3) + (2,) * (rank_extra - 1)
    q = rng.integers(-128, 128, shape).astype(np.int8)
    scale = (rng.random(shape[axis]) + 0.1).astype(np.float32) if per_channel else np.float32(0.05)
    zero = rng.integers(-5, 5, np.shape(scale)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=axis),
             helper.make_node("Conv" if len(shape) > 2 else "MatMul", ["x", "w"], ["y"], name="layer")]
    x_shape = [1, 3, 4] if len(shape) == 3 else ([1, 3, 4, 4] if len(shape) == 4 else [2, 4])
    model = make_model(nodes, [value("x", x_shape)], [value("y", None)],
                       [tensor("q", q), tensor("s", scale), tensor("z", zero)], opset=13)
    with Session(model, ["w"]) as session:
        expected = session.run({"x": np.zeros(x_shape, np.float32)}, ["w"])["w"]
    (row,) = layer_table(model)
    assert row["dtype"] == "int8" and row["shape"] == list(shape)
    values = layer_weights(model)["layer"][2]()
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert row["sparsity"] == np.mean(values == 0) and row["params"] == q.size


@settings(max_examples=30, deadline=None)
@given(st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_sparsity_is_the_fraction_of_zero_weights_and_a_model_equals_itself(fraction, seed):
    model = mlp(seed=seed % 1000, hidden=16)
    store = WeightStore(model.graph)
    weight = store.array("w1").copy()
    weight[np.random.default_rng(seed).random(weight.shape) < fraction] = 0
    store.set_array("w1", weight)
    rows = {row["name"]: row for row in layer_table(model, model)}
    assert rows["fc1"]["sparsity"] == np.mean(weight == 0) == rows["fc1"]["sparsity_before"]
    assert rows["fc1"]["weight_change"] in (0.0, None) and rows["fc2"]["weight_change"] == 0.0
