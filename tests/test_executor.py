"""The executor seam in this process: sharded validation and calibration give the in-memory run's
verdicts, counts, maxima and histograms; any shard size the same counts; .npz shards as data.
(tests/test_ray.py runs the same checks on Ray workers.)"""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxopt
from onnxopt import executor as executor_module
from onnxopt import registry
from onnxopt.calibration import collect
from onnxopt.cli import main
from onnxopt.data import FeedSet, as_feeds
from onnxopt.errors import InputError
from onnxopt.executor import InProcess, split
from onnxopt.sharded import OutputSums, output_sums
from onnxopt.validate import Tolerances, output_metrics

from conftest import make_model, mlp, tensor, value
from test_cli import _ScaleWeights
from test_gates import _SignFlip, conv_feeds, deep_conv_net

PIPELINES = [
    ("cleanup", {}),  # exact steps validated together
    ("dce,lift-constants,prune(sparsity=0.3),dce", {"min_cosine": 0}),  # subset check, lossy, final exact
    ("dce,prune(sparsity=0.6),prune-neurons(ratio=0.5)", {"min_cosine": 0.999}),  # lossy steps judged together, failing
]


def mlp_data(count=150, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((count, 2, 8)).astype(np.float32)}, rng.integers(0, 4, (count, 2))


def normalized(report, floats: bool = True) -> dict:
    """A report without timings and the executor; with ``floats=False`` only what sharding cannot change:
    verdicts, failures' first words, counts, maxima, accuracies."""
    d = report.to_dict()
    d.pop("executor")
    d.pop("reproducer")
    d["feeds"].pop("origin")
    d["gates"].pop("threads")  # onnxruntime threads: the default in this process, one per worker when sharded
    for step in d["steps"]:
        step.pop("seconds")
        if not floats:
            for side in ("vs_previous", "vs_original"):
                for m in (step[side] or {}).get("outputs", {}).values():
                    for k in ("cosine", "rel_l2", "snr_db"):
                        m.pop(k)
                if step[side]:
                    step[side]["failures"] = [f.split(":")[0] for f in step[side]["failures"]]
    if not floats:
        d["failure"] = d["failure"] and d["failure"].split(":")[0]
    return d


def assert_same_report(held, sharded):
    """Verdicts, counts and maxima equal; float sums equal to rounding."""
    assert json.dumps(normalized(held, False), sort_keys=True) == json.dumps(normalized(sharded, False), sort_keys=True)
    for a, b in zip(held.steps, sharded.steps):
        for side in ("vs_previous", "vs_original"):
            for name, m in (getattr(a, side) or {}).get("outputs", {}).items():
                n = getattr(b, side)["outputs"][name]
                assert n["cosine"] == pytest.approx(m["cosine"], rel=1e-12, abs=1e-12)
                assert n["rel_l2"] == pytest.approx(m["rel_l2"], rel=1e-9, abs=1e-12)


@pytest.fixture
def test_passes(monkeypatch):
    for p in (_ScaleWeights, _SignFlip):
        monkeypatch.setitem(registry.PASSES, p.name, p)


def run_both(model_fn, pipeline, executor, tmp_path, **kwargs):
    held = onnxopt.optimize(model_fn(), pipeline, repro_dir=tmp_path / "held", **kwargs)
    sharded = onnxopt.optimize(model_fn(), pipeline, repro_dir=tmp_path / "sharded", executor=executor, **kwargs)
    return held, sharded


@pytest.mark.parametrize("pipeline,options", PIPELINES)
def test_sharded_validation_gives_the_in_memory_verdicts_and_counts(pipeline, options, tmp_path, monkeypatch):
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 32)
    data, labels = mlp_data()
    with InProcess() as executor:
        held, sharded = run_both(lambda: mlp(hidden=32, with_dead_branch=True), pipeline, executor, tmp_path,
                                 data=data, labels=labels, max_accuracy_drop=100, **options)
    assert_same_report(held.report, sharded.report)
    assert sharded.report.executor["shards"] == 6  # the 8-sample subset, then 32 samples a shard
    assert sharded.report.executor["tasks"] > 6 and held.report.to_dict()["executor"]["name"] == "in-process"
    assert onnx.printer.to_text(held.model) == onnx.printer.to_text(sharded.model)


def test_a_wrong_exact_step_is_bisected_the_same_through_the_executor(tmp_path, test_passes):
    with InProcess() as executor:
        held, sharded = run_both(lambda: mlp(with_dead_branch=True),
                                 "dce,lift-constants,scale-weights-test,remove-noops", executor, tmp_path)
    assert sharded.report.failure.startswith("step 3 'scale-weights-test': not exact: output 'y'")
    assert_same_report(held.report, sharded.report)


def test_the_noise_calibrated_gate_fails_a_wrong_fold_through_the_executor(tmp_path, test_passes):
    with InProcess() as executor:
        result = onnxopt.optimize(deep_conv_net(), _SignFlip.name, data=conv_feeds(), executor=executor,
                                  repro_dir=tmp_path / "r")
        sound = onnxopt.optimize(deep_conv_net(), "fold-batchnorm", data=conv_feeds(), executor=executor)
    assert result.report.failure.startswith(f"step 1 '{_SignFlip.name}': not exact: output 'y'")
    assert sound.report.passed and sound.report.gates["exact"]["noise"]["y"] > 0


def test_shard_size_changes_no_count_and_no_maximum(monkeypatch, tmp_path):
    data, labels = mlp_data(100)
    reports = []
    for size in (7, 64):
        monkeypatch.setattr(executor_module, "SHARD_SAMPLES", size)
        with InProcess() as executor:
            reports.append(onnxopt.optimize(mlp(hidden=32), "prune(sparsity=0.5)", data=data, labels=labels,
                                            max_accuracy_drop=100, min_cosine=0, executor=executor).report)
    assert_same_report(*reports)
    assert [r.executor["shards"] for r in reports] == [15, 3]


def test_a_data_error_on_a_shard_fails_with_the_in_process_message(tmp_path):
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"])], [value("ids", ["n"], onnx.TensorProto.INT64)],
                       [value("y", ["n", 4])], [tensor("table", table)])
    ids = np.zeros((100, 3), np.int64)
    ids[90, 1] = 12  # out of the table, in the last shard
    with pytest.raises(InputError) as held:
        onnxopt.optimize(model, "dce", data={"ids": ids})
    with InProcess() as executor, pytest.raises(InputError) as sharded:
        onnxopt.optimize(model, "dce", data={"ids": ids}, executor=executor)
    assert str(sharded.value) == str(held.value)
    assert "onnxruntime failed to run the model" in str(held.value)


# --------------------------------------------------------------------------- mergeable sums


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(1, 39), max_size=4), st.integers(0, 2**31))
def test_sums_of_any_split_give_the_whole_outputs_metrics(samples, cuts, seed):
    rng = np.random.default_rng(seed)
    ref = [rng.standard_normal((1, 5)).astype(np.float32) for _ in range(samples)]
    cand = [r + rng.standard_normal(r.shape).astype(np.float32) * rng.choice([0, 1e-7, 0.1]) for r in ref]
    whole = output_metrics(ref, cand, Tolerances())
    scale = float(np.sqrt(np.mean(np.square(np.concatenate(ref).astype(np.float64)))))
    bounds = sorted({0, samples, *(c for c in cuts if c < samples)})
    parts = [output_sums(ref[a:b], cand[a:b], Tolerances(), 1e-6, scale) for a, b in zip(bounds, bounds[1:])]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    m = merged.metrics()
    assert (m.max_abs, m.max_rel, m.mismatches, m.top1_agreement) == (
        whole.max_abs, whole.max_rel, whole.mismatches, whole.top1_agreement)
    assert m.cosine == pytest.approx(whole.cosine, abs=1e-12) and m.rel_l2 == pytest.approx(whole.rel_l2, abs=1e-12)


def test_string_and_shape_mismatches_merge_like_the_whole():
    strings = output_sums([np.array(["a"])], [np.array(["b"])], Tolerances(), 1e-6, 0.0).merge(
        output_sums([np.array(["c"])], [np.array(["c"])], Tolerances(), 1e-6, 0.0)).metrics()
    assert strings.mismatches == 1 and strings.cosine == 0.0 and not strings.within_exact_tolerance
    same = OutputSums(unequal_strings=0).metrics()
    assert same.within_exact_tolerance and same.cosine == 1.0
    shapes = output_sums([np.ones((1, 3), np.float32)], [np.ones((1, 4), np.float32)], Tolerances(), 1e-6, 1.0)
    assert shapes.merge(OutputSums(values=3)).metrics().max_abs == np.inf


# --------------------------------------------------------------------------- calibration


def test_sharded_calibration_equals_the_single_stream(monkeypatch):
    monkeypatch.setattr(executor_module, "SHARD_SAMPLES", 9)
    model = mlp(hidden=32)
    feeds = FeedSet(mlp_data(50)[0], "t")
    wanted = dict(histogram_bins=2048, sumsq_axes={"h": -1}, mean_axes={"r": -1})
    single = collect(model, feeds, ["x", "h", "y"], **wanted)
    with InProcess() as executor:
        sharded = collect(model, feeds, ["x", "h", "y"], executor=executor, **wanted)
        assert executor.tasks == 6
    assert list(single) == list(sharded)
    for name, a in single.items():
        b = sharded[name]
        assert (a.count, a.min, a.max, a.channel_count) == (b.count, b.min, b.max, b.channel_count)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.code_counts, b.code_counts)
        for field in ("channel_sum", "channel_sumsq", "channel_min", "channel_max"):
            if getattr(a, field) is not None:
                np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-12)
            else:
                assert getattr(b, field) is None


def test_quantize_calibrates_through_the_executor_to_the_same_model(tmp_path):
    data = mlp_data(40)[0]
    held = onnxopt.optimize(mlp(hidden=32), "quantize(mode=static)", calib=data, data=data, min_cosine=0)
    with InProcess() as executor:
        sharded = onnxopt.optimize(mlp(hidden=32), "quantize(mode=static)", calib=data, data=data, min_cosine=0,
                                   executor=executor)
    assert held.report.passed and sharded.report.passed
    assert held.model == sharded.model


# --------------------------------------------------------------------------- .npz shards as data


def write_shards(folder, arrays, cuts):
    folder.mkdir()
    paths = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(next(iter(arrays.values())))])):
        paths.append(folder / f"part{i:02d}.npz")
        np.savez(paths[-1], **{k: v[a:b] for k, v in arrays.items()})
    return paths


def test_npz_shards_as_a_list_or_a_folder_are_the_same_data(tmp_path):
    data, _ = mlp_data(70)
    paths = write_shards(tmp_path / "shards", data, [10, 45])
    model = mlp()
    for source in (paths, tmp_path / "shards", [str(p) for p in paths]):
        feeds = as_feeds(source, model)
        assert len(feeds) == 70
        np.testing.assert_array_equal(np.asarray(feeds.arrays["x"]), data["x"])
        np.testing.assert_array_equal(np.stack([f["x"] for f in feeds]), data["x"])
        window = feeds.window(40, 50)  # across two files
        np.testing.assert_array_equal(next(window.batches(10))["x"], data["x"][40:50].reshape(-1, 8))
    assert [len(s.feeds) for s in split(as_feeds(paths, model), 30)] == [30, 30, 10]
    with InProcess() as executor:
        sharded = onnxopt.optimize(mlp(), "prune(sparsity=0.3)", data=paths, min_cosine=0, executor=executor)
    whole = onnxopt.optimize(mlp(), "prune(sparsity=0.3)", data=data, min_cosine=0)
    assert_same_report(whole.report, sharded.report)


def test_npz_shards_that_disagree_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 2, 8), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 2, 8), np.float64))
    np.savez(tmp_path / "c.npz", z=np.zeros((2, 2, 8), np.float32))
    with pytest.raises(InputError, match="differ in dtype or sample shape"):
        as_feeds([tmp_path / "a.npz", tmp_path / "b.npz"], mlp())
    with pytest.raises(InputError, match="holds arrays \\['z'\\], the first shard"):
        as_feeds([tmp_path / "a.npz", tmp_path / "c.npz"], mlp())
    with pytest.raises(InputError, match="data file not found"):
        as_feeds([tmp_path / "a.npz", tmp_path / "missing.npz"], mlp())


# --------------------------------------------------------------------------- CLI


def test_cli_takes_npz_shards_and_records_the_executor(tmp_path):
    data, _ = mlp_data(20)
    paths = write_shards(tmp_path / "shards", data, [12])
    onnx.save(mlp(), tmp_path / "m.onnx")
    args = ["optimize", str(tmp_path / "m.onnx"), "-p", "dce", "--report", str(tmp_path / "r.json")]
    result = CliRunner().invoke(main, [*args, "--data", str(paths[0]), "--data", str(paths[1])])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["feeds"]["samples"] == 20 and report["executor"] == {"name": "in-process", "workers": 1}


def test_cli_refuses_a_ray_address_without_the_ray_executor(tmp_path):
    onnx.save(mlp(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "-p", "dce", "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address needs --executor ray" in result.output
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "-p", "dce", "--executor", "spark"])
    assert result.exit_code == 2 and "'spark' is not one of" in result.output
