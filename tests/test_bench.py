"""onnxopt bench: interleaved onnxruntime timings, sizes and peak memory against the first model."""

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

import onnxopt
from onnxopt import api
from onnxopt.benchmark import _run_order, benchmark, format_benchmark
from onnxopt.cli import main
from onnxopt.errors import InputError

from conftest import make_model, mlp, tensor, value


def heavy(width: int = 384, layers: int = 6):
    """Same interface as conftest's mlp (x[batch,8] -> y[batch,4]) but far more arithmetic."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    inits = [tensor("w_in", rng.standard_normal((8, width)).astype(np.float32))]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
        inits.append(tensor(f"w{i}", rng.standard_normal((width, width)).astype(np.float32) / width))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["y"]))
    inits.append(tensor("w_out", rng.standard_normal((width, 4)).astype(np.float32)))
    return make_model(nodes, [value("x", ["batch", 8])], [value("y", ["batch", 4])], inits)


@pytest.fixture
def models(tmp_path):
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    onnxopt.save_model(mlp(), small)
    onnxopt.save_model(heavy(), big)
    return small, big


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_ratios_are_against_the_first_model_and_see_a_heavier_model(models):
    small, big = models
    result = benchmark([small, big, small], runs=20)
    first, heavier, again = result.models
    assert first.vs_first == {"latency": 1.0, "throughput": 1.0, "size": 1.0, "memory": 1.0}
    assert heavier.vs_first["latency"] > 3 and heavier.vs_first["size"] > 100
    assert 0.5 < again.vs_first["latency"] < 2 and again.vs_first["size"] == 1.0  # the same model: no difference
    assert heavier in result.slower()
    assert first.file_bytes == small.stat().st_size
    assert heavier.peak_memory_bytes > first.peak_memory_bytes > 0  # 3.5 MB of weights in the session
    for m in result.models:
        assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms and m.spread >= 0 and m.throughput_per_s > 0


def test_the_same_model_twice_is_not_slower(models):
    result = benchmark([models[1], models[1]], runs=30, memory=False)
    assert 0.8 < result.models[1].vs_first["latency"] < 1.25 and not result.slower()


def test_models_in_memory_and_given_data(models, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32))
    result = benchmark({"a": mlp(), "b": models[0]}, data=data, runs=3, memory=False)
    assert [m.label for m in result.models] == ["a", "b"]
    assert result.feeds == {"origin": str(data), "samples": 5, "notes": []} and result.runs == 3
    assert all(m.peak_memory_bytes is None for m in result.models) and result.models[1].vs_first["memory"] is None
    assert "a " in format_benchmark(result)


def test_external_data_counts_in_the_file_size(tmp_path):
    path = tmp_path / "ext.onnx"
    onnxopt.save_model(heavy(width=64, layers=1), path, external=True)
    result = benchmark([path], runs=2, memory=False)
    weights = (8 * 64 + 64 * 64 + 64 * 4) * 4
    assert result.models[0].file_bytes >= path.stat().st_size + weights


def test_cli_json_fields(models):
    small, big = models
    result = invoke("bench", small, big, "--runs", 5, "--threads", 2, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["threads"] == 2 and document["runs"] == 5 and document["feeds"]["origin"] == "random"
    assert document["feeds"]["notes"] == ["input 'x': symbolic dims batch taken as 1"]
    assert [m["label"] for m in document["models"]] == [str(small), str(big)]
    for m in document["models"]:
        assert {"file_bytes", "median_ms", "p10_ms", "p90_ms", "spread", "throughput_per_s", "peak_memory_bytes",
                "vs_first"} <= m.keys()
        assert set(m["vs_first"]) == {"latency", "throughput", "size", "memory"}


def test_cli_table(models):
    result = invoke("bench", models[0], models[1], "--runs", 3)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "interleaved" in lines[0] and "median ms" in lines[1]
    assert lines[3].split()[-3:] == ["1.00x", "1.00x", "1.00x"]


@pytest.mark.parametrize("content, message", [
    (b"not a model", "not an ONNX model"),
    (b"", "empty"),
])
def test_cli_bad_model_exits_2_with_one_line(models, tmp_path, content, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    result = invoke("bench", models[0], bad)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_cli_refusals(models, tmp_path):
    assert invoke("bench", tmp_path / "missing.onnx").exit_code == 2
    runs = invoke("bench", models[0], "--runs", 0)
    assert runs.exit_code == 2 and "runs must be at least 1" in runs.output
    threads = invoke("bench", models[0], "--threads", 0)
    assert threads.exit_code == 2 and "threads" in threads.output
    assert invoke("bench").exit_code == 2  # no model: click's usage error


def test_models_with_other_inputs_are_named(models, tmp_path):
    other = tmp_path / "other.onnx"
    model = mlp()
    model.graph.input[0].name = "z"
    model.graph.node[0].input[0] = "z"
    onnxopt.save_model(model, other)
    result = invoke("bench", models[0], other, "--runs", 2)
    assert result.exit_code == 2 and str(other) in result.output and "['z']" in result.output
    with pytest.raises(InputError, match="share their inputs"):
        api.bench([models[0], other], runs=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "ppocr_cls", "minilm_l3"])
def test_real_models_bench(shared_models, name):
    folder = shared_models / name
    result = benchmark([folder / "model.onnx", folder / "model.onnx"], data=folder / "eval.npz", runs=10)
    assert result.models[1].vs_first["size"] == 1.0 and 0.5 < result.models[1].vs_first["latency"] < 2
    assert result.models[0].peak_memory_bytes > 0


@given(st.integers(1, 9))
def test_run_order_balances_positions_and_neighbours(n):
    """Over 2n runs every model takes every position equally often and follows each neighbour equally often."""
    orders = [_run_order(list(range(n)), run) for run in range(2 * n)]
    assert all(sorted(order) == list(range(n)) for order in orders)
    positions = Counter((k, order.index(k)) for order in orders for k in order)
    assert set(positions.values()) == {2}
    follows = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    if n > 2:
        assert all(follows[(k, (k + 1) % n)] == follows[((k + 1) % n, k)] for k in range(n))
