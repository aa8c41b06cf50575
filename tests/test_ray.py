"""The Ray executor on a real local Ray instance (ray.init(num_cpus=2), one per module: startup is slow):
bit-identical to the in-process executor for any number of workers, a data error raised as in-process,
a dead worker retried; slow-marked: a two-node cluster on this machine, through the CLI."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxopt
from onnxopt import executor as executor_module
from onnxopt.calibration import collect
from onnxopt.cli import main
from onnxopt.data import FeedSet
from onnxopt.errors import InputError
from onnxopt.executor import InProcess, RayExecutor, split

from conftest import mlp
from test_executor import PIPELINES, mlp_data, normalized, write_shards

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARD_SAMPLES = executor_module.SHARD_SAMPLES


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 32)


def exact_report(report) -> str:
    """The report without timings (quantize's mode choice times each mode: 'latency_ms')."""
    return re.sub(r'"latency_ms": [0-9.e-]+', "", json.dumps(normalized(report), sort_keys=True))


@pytest.mark.parametrize("pipeline,options", PIPELINES)
def test_ray_workers_give_the_in_process_executors_report_bit_for_bit(pipeline, options, tmp_path):
    data, labels = mlp_data()
    reports = []
    for executor in (InProcess(), RayExecutor(workers=2), RayExecutor(workers=1)):
        with executor:
            result = onnxopt.optimize(mlp(hidden=32, with_dead_branch=True), pipeline, data=data, labels=labels,
                                      max_accuracy_drop=100, executor=executor, repro_dir=tmp_path / "r", **options)
        reports.append(result.report)
    assert exact_report(reports[0]) == exact_report(reports[1]) == exact_report(reports[2])
    assert [r.executor["name"] for r in reports] == ["in-process", "ray", "ray"]
    assert [r.executor["workers"] for r in reports] == [1, 2, 1]
    assert reports[1].executor["shards"] == 6


def test_ray_calibration_statistics_equal_the_in_process_executors():
    model = mlp(hidden=32)
    feeds = FeedSet(mlp_data(100)[0], "t")
    wanted = dict(histogram_bins=2048, sumsq_axes={"h": -1}, mean_axes={"r": -1})
    with InProcess() as local, RayExecutor(workers=2) as remote:
        a = collect(model, feeds, ["x", "h", "y"], executor=local, **wanted)
        b = collect(model, feeds, ["x", "h", "y"], executor=remote, **wanted)
        assert remote.tasks == 4
    for name in a:
        for field in ("count", "min", "max", "channel_count", "codes", "code_counts", "channel_sum", "channel_sumsq",
                      "channel_min", "channel_max"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert (x is None and y is None) or np.array_equal(x, y), (name, field)


def test_quantize_on_ray_gives_the_same_model_and_report(tmp_path):
    data = mlp_data(80)[0]
    results = []
    for executor in (InProcess(), RayExecutor(workers=2)):
        with executor:
            results.append(onnxopt.optimize(mlp(hidden=32), "quantize(mode=static)", calib=data, data=data, min_cosine=0,
                                            executor=executor))
    assert results[0].model == results[1].model
    assert exact_report(results[0].report) == exact_report(results[1].report)


def test_npz_shards_are_read_on_the_workers(tmp_path):
    data, labels = mlp_data(90)
    paths = write_shards(tmp_path / "shards", data, [20, 50])
    with RayExecutor(workers=2) as executor:
        sharded = onnxopt.optimize(mlp(), "prune(sparsity=0.3)", data=tmp_path / "shards", labels=labels,
                                   max_accuracy_drop=100, min_cosine=0, executor=executor)
    with InProcess() as executor:
        local = onnxopt.optimize(mlp(), "prune(sparsity=0.3)", data=data, labels=labels, max_accuracy_drop=100,
                                 min_cosine=0, executor=executor)
    assert exact_report(sharded.report).replace(str(tmp_path / "shards"), "") == exact_report(local.report)
    assert len(paths) == 3


def test_a_data_error_on_a_ray_worker_fails_with_the_in_process_message():
    from test_executor import make_model, tensor, value
    from onnx import helper

    table = np.zeros((10, 4), np.float32)
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"])],
                       [value("ids", ["n"], onnx.TensorProto.INT64)], [value("y", ["n", 4])], [tensor("table", table)])
    ids = np.zeros((100, 3), np.int64)
    ids[70, 2] = 11
    with pytest.raises(InputError) as held:
        onnxopt.optimize(model, "dce", data={"ids": ids})
    with RayExecutor(workers=2) as executor, pytest.raises(InputError) as remote:
        onnxopt.optimize(model, "dce", data={"ids": ids}, executor=executor)
    assert type(remote.value) is InputError and str(remote.value) == str(held.value)


def test_a_worker_that_dies_mid_run_is_restarted_and_its_shard_retried(tmp_path):
    marker = tmp_path / "died-once"

    def dies_once_on_shard_two(cache, shard, scale):
        if shard.index == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies, as a machine that goes away
        return float(np.asarray(shard.feeds.arrays["x"]).sum()) * scale, os.getpid()

    feeds = FeedSet(mlp_data(200)[0], "t")
    shards = split(feeds)
    with RayExecutor(workers=2) as executor:
        got = executor.map(dies_once_on_shard_two, shards, 2.0)
    expected = InProcess().map(lambda c, s, k: float(np.asarray(s.feeds.arrays["x"]).sum()) * k, shards, 2.0)
    assert [v for v, _ in got] == expected
    assert marker.exists() and int(marker.read_text()) != got[2][1]  # shard 2 ran again in a new process


def test_cli_runs_validation_on_ray_and_records_it(tmp_path):
    data, _ = mlp_data(70)
    np.savez(tmp_path / "d.npz", **data)
    onnx.save(mlp(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-p",
                                       "dce,prune(sparsity=0.2)", "--data", str(tmp_path / "d.npz"), "--executor",
                                       "ray", "--workers", "2", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["executor"]["name"] == "ray" and report["executor"]["workers"] == 2
    # shards of 8 (the exact subset), 32, 30 samples: the original on 3, dce on the subset, prune on 3
    assert report["executor"]["shards"] == 3 and report["executor"]["tasks"] == 7


# --------------------------------------------------------------------------- a two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_cluster_on_this_machine_gives_the_same_report(tmp_path, monkeypatch):
    """`ray start --head` plus a second `ray start --address` (both --block, stopped by their process
    group), then the CLI in a fresh process with --ray-address: the in-process executor's report."""
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", DEFAULT_SHARD_SAMPLES)  # as the CLI process has it
    port = _free_port()
    # a throwaway cluster of this test only: no token to share between its processes
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled"}
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    nodes = [subprocess.Popen([*ray_cli, "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", temp_dir, *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(8)
        nodes.append(subprocess.Popen([*ray_cli, "--address", f"127.0.0.1:{port}", *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        data, labels = mlp_data(150)
        np.savez(tmp_path / "d.npz", **data)
        np.savez(tmp_path / "labels.npz", labels=labels)
        onnx.save(mlp(hidden=32, with_dead_branch=True), tmp_path / "m.onnx")
        args = ["-m", "onnxopt", "optimize", str(tmp_path / "m.onnx"), "-p", PIPELINES[1][0], "--min-cosine", "0",
                "--data", str(tmp_path / "d.npz"), "--labels", str(tmp_path / "labels.npz")]
        deadline = time.time() + 60
        while True:  # the second node joins within seconds
            remote = subprocess.run([sys.executable, *args, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}",
                                     "--report", str(tmp_path / "ray.json")], env=env, capture_output=True, text=True,
                                    timeout=240)
            report = json.loads((tmp_path / "ray.json").read_text()) if remote.returncode == 0 else None
            if report is None or report["executor"]["workers"] == 2 or time.time() > deadline:
                break
        assert remote.returncode == 0, remote.stderr
        assert report["executor"]["workers"] == 2
        with InProcess() as executor:
            local = onnxopt.optimize(str(tmp_path / "m.onnx"), PIPELINES[1][0], min_cosine=0,
                                     data=str(tmp_path / "d.npz"), labels=str(tmp_path / "labels.npz"),
                                     executor=executor)
        local_report = local.report.to_dict()
        for r in (report, local_report):
            r.pop("executor")
            for step in r["steps"]:
                step.pop("seconds")
        assert json.dumps(report, sort_keys=True) == json.dumps(local_report, sort_keys=True)
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, 15)
        for node in nodes:
            node.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- reconstruction statistics, trials


@pytest.mark.slow
def test_ray_reconstruction_statistics_equal_the_in_process_executors_bit_for_bit():
    """GPTQ's one pass (XᵀX of every layer input), SparseGPT's and distill's layer by layer (shard runners pinned
    to workers, each layer's change sent before the next layer's statistics)."""
    from onnxopt.passes.prune import Prune
    from onnxopt.reconstruction import LayerGeometry
    from onnxopt.reconstruction.stream import input_statistics
    from test_executor_reconstruction import distilled, prune, residual_block, scaled_feeds
    from test_sparsegpt import correlated_mlp

    model, feeds = scaled_feeds()
    layers = {"x": LayerGeometry.linear(32, 1), "r1": LayerGeometry.linear(48, 1), "r2": LayerGeometry.linear(48, 1)}
    model_p, calib, _ = correlated_mlp()
    teacher = residual_block()
    student = Prune(Prune.Options(sparsity=0.75))(teacher.__deepcopy__()).model
    results = []
    for executor in (InProcess(), RayExecutor(workers=2), RayExecutor(workers=1)):
        with executor:
            results.append((input_statistics(model, feeds, layers, bias=False, executor=executor),
                            prune(model_p, calib, executor), distilled(student, teacher, executor)))
    (grams, pruned, repaired), others = results[0], results[1:]
    assert repaired.stats["layers_refit"] == 2 and repaired.stats["stream_targets"] == 1
    for other_grams, other_pruned, other_repaired in others:
        for name in layers:
            np.testing.assert_array_equal(other_grams[name].gram, grams[name].gram)
        assert other_pruned.model == pruned.model and other_pruned.stats == pruned.stats
        assert other_repaired.model == repaired.model and other_repaired.stats == repaired.stats


@pytest.mark.slow
def test_ray_accuracy_aware_trials_choose_what_the_in_process_executor_chooses():
    from test_executor_reconstruction import accuracy_aware, sensitive_mlp

    model, feeds = sensitive_mlp()
    results = []
    for executor in (InProcess(), RayExecutor(workers=2)):
        with executor:
            results.append(accuracy_aware(model, feeds, executor))
    assert results[0].model == results[1].model
    assert results[0].stats == results[1].stats and results[0].details["sensitivity"] == results[1].details["sensitivity"]
    assert results[1].stats["kept_float"] >= 2


@pytest.mark.slow
def test_a_worker_that_dies_between_layers_replays_the_changes_on_its_restart(tmp_path, monkeypatch):
    """SparseGPT's shard runners live on the workers: a restarted worker rebuilds them from the model and
    every layer change so far, and prunes as if nothing happened."""
    from onnxopt.reconstruction import stream
    from test_executor_reconstruction import prune
    from test_sparsegpt import correlated_mlp

    model, calib, _ = correlated_mlp()
    with InProcess() as executor:
        expected = prune(model, calib, executor)
    marker = tmp_path / "died"
    runner_task = stream._runner_task

    def dies_once_at_the_second_layer(cache, shard, job):
        if len(job.changes) == 1 and shard.index == 1 and not marker.exists():
            marker.write_text("1")
            os._exit(1)
        return runner_task(cache, shard, job)

    monkeypatch.setattr(stream, "_runner_task", dies_once_at_the_second_layer)
    with RayExecutor(workers=2) as executor:
        got = prune(model, calib, executor)
    assert marker.exists() and got.model == expected.model
