"""The validation gates and what they cost: default lossy gate, noise-calibrated exact gate, exact
steps validated together and bisected only on failure."""

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import onnxopt
from onnxopt import manager, registry
from onnxopt.cli import main
from onnxopt.data import FeedSet
from onnxopt.graph import WeightStore
from onnxopt.passes.base import Pass, PassResult
from onnxopt.passes.fold_batchnorm import FoldBatchNorm
from onnxopt.validate import Tolerances, compare_outputs, exact_atols, measure_noise, run_model

from conftest import make_model, mlp, tensor, value
from test_cli import _ScaleWeights

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def deep_conv_net(layers: int = 12, channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x[1,3,16,16] -> (Conv -> BatchNormalization -> Relu) x layers -> Softmax(10 x, channels) -> y.

    BatchNorm statistics like a trained net's: variances from 1e-3 to 10, means of a few standard
    deviations, scales gamma / sqrt(var) of 0.5 to 2, so folding moves the outputs by float rounding
    that the layers propagate, and the sharp softmax head (like a recognizer's) turns into absolute
    error on its small probabilities. The last
    BatchNormalization has epsilon 1e-2 (a real choice of some exporters), so dropping it matters.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, x, c_in = [], [], "x", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
        var = 10 ** rng.uniform(-3, 1, channels)
        mean = rng.standard_normal(channels) * np.sqrt(var) * 2
        gamma = rng.uniform(0.5, 2, channels) * np.sqrt(var)  # scales of 0.5 to 2: activations stay O(1)
        inits += [tensor(f"w{i}", w), tensor(f"g{i}", gamma.astype(np.float32)),
                  tensor(f"b{i}", rng.standard_normal(channels).astype(np.float32)),
                  tensor(f"m{i}", mean.astype(np.float32)), tensor(f"v{i}", var.astype(np.float32))]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"],
                                   name=f"bn{i}", epsilon=1e-2 if i == layers - 1 else 1e-5),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"])]
        x, c_in = f"r{i}", channels
    inits.append(tensor("sharpness", np.float32(10)))
    nodes += [helper.make_node("Mul", [x, "sharpness"], ["logits"]), helper.make_node("Softmax", ["logits"], ["y"], axis=1)]
    return make_model(nodes, [value("x", [1, 3, 16, 16])], [value("y", [1, channels, 16, 16])], inits)


def conv_feeds(count: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, 1, 3, 16, 16)).astype(np.float32)}


class _WrongFold(Pass):
    """fold-batchnorm after corrupting one BatchNormalization's parameters: a wrong 'exact' fold."""

    exact = True
    summary = "a deliberately wrong BatchNorm fold"
    layer = 0

    def corrupt(self, store: WeightStore, node: onnx.NodeProto) -> None:
        raise NotImplementedError

    def run(self, model):
        node = next(n for n in model.graph.node if n.name == f"bn{self.layer}")
        self.corrupt(WeightStore(model.graph), node)
        return FoldBatchNorm()(model)


class _SignFlip(_WrongFold):
    name = "fold-sign-flip-test"
    layer = 5

    def corrupt(self, store, node):
        gamma = store.array(node.input[1]).copy()
        gamma[3] = -gamma[3]
        store.set_array(node.input[1], gamma)


class _WrongChannel(_WrongFold):
    name = "fold-wrong-channel-test"
    layer = 8

    def corrupt(self, store, node):
        store.set_array(node.input[3], np.roll(store.array(node.input[3]), 1))  # mean of channel c-1 for c


class _EpsilonDropped(_WrongFold):
    name = "fold-epsilon-dropped-test"
    layer = 11

    def corrupt(self, store, node):
        for attr in node.attribute:
            if attr.name == "epsilon":
                attr.f = 0.0


class _Invalid(Pass):
    """Claims to be exact and leaves a node of an unknown operator: what the checker catches."""

    name = "invalid-node-test"
    summary = "adds an unknown op"
    exact = True

    def run(self, model):
        model.graph.node.append(helper.make_node("NoSuchOp", ["x"], ["junk"]))
        return PassResult(model, True, {})


class _Crash(Pass):
    name = "crash-late-test"
    summary = "raises"
    exact = True

    def run(self, model):
        raise RuntimeError("boom")


@pytest.fixture
def test_passes(monkeypatch):
    for p in (_SignFlip, _WrongChannel, _EpsilonDropped, _ScaleWeights, _Invalid, _Crash):
        monkeypatch.setitem(registry.PASSES, p.name, p)


# --------------------------------------------------------------------------- the default lossy gate


def test_readme_wrecked_neuron_pruning_fails_by_default_and_passes_when_relaxed(tmp_path):
    args = ["optimize", SAMPLES / "mlp.onnx", "--calib", SAMPLES / "mlp.calib.npz",
            "-p", "prune-neurons(ratio=0.5,method=wanda),zero-rows,dce", "--data", SAMPLES / "mlp.eval.npz",
            "--repro-dir", tmp_path / "r"]
    labels = ["--labels", SAMPLES / "mlp.labels.npz"]
    by_accuracy = invoke(*args, *labels)  # with labels the accuracy gate judges: 98.44% -> 76.56%
    assert by_accuracy.exit_code == 1
    assert "points below the original's 98.44% (max-accuracy-drop 1)" in by_accuracy.output
    assert "min-cosine" not in by_accuracy.output
    by_cosine = invoke(*args)  # without labels, the cosine gate
    assert by_cosine.exit_code == 1 and "< min-cosine 0.99" in by_cosine.output
    relaxed = invoke(*args, *labels, "--max-accuracy-drop", "100")
    assert relaxed.exit_code == 0, relaxed.output
    assert "verdict: PASSED (lossy gate: accuracy drop <= 100 points; exact gate:" in relaxed.output
    assert invoke(*args, "--min-cosine", "0").exit_code == 0


def test_api_has_the_same_default_gates(tmp_path):
    def run_with(**gates):
        return onnxopt.optimize(SAMPLES / "cnn.onnx", "prune-neurons(ratio=0.5)", data=SAMPLES / "cnn.eval.npz",
                                repro_dir=tmp_path / "r", **gates).report

    assert "cosine 0.06" in run_with().failure and "< min-cosine 0.99" in run_with().failure
    labelled = run_with(labels=SAMPLES / "cnn.labels.npz")
    assert "max-accuracy-drop 1" in labelled.failure and "min-cosine" not in labelled.failure
    both = run_with(labels=SAMPLES / "cnn.labels.npz", min_cosine=0.99)  # an explicit cosine gate applies too
    assert "min-cosine 0.99" in both.failure and "max-accuracy-drop 1" in both.failure
    assert run_with(min_cosine=0).passed
    assert run_with(labels=SAMPLES / "cnn.labels.npz", max_accuracy_drop=100).passed


def test_consecutive_lossy_steps_are_judged_after_the_last(tmp_path):
    report = onnxopt.optimize(SAMPLES / "mlp.onnx", "prune(sparsity=0.5),prune(sparsity=0.5),dce",
                              data=SAMPLES / "mlp.eval.npz", repro_dir=tmp_path / "r").report
    assert report.failure.startswith("step 2 'prune': output 'logits': cosine")
    assert report.failure.endswith("(lossy steps 1-2 judged together)")
    assert report.steps[0].passed and report.steps[0].checks["lossy_gate"] == "judged with the next lossy step"
    assert report.steps[0].vs_original["outputs"]["logits"]["cosine"] < 0.99  # measured, not gated


def test_a_sound_lossy_step_passes_and_the_verdict_names_the_gate(tmp_path):
    report = tmp_path / "r.json"
    result = invoke("optimize", SAMPLES / "mlp.onnx", "-p", "quantize", "--calib", SAMPLES / "mlp.calib.npz",
                    "--data", SAMPLES / "mlp.eval.npz", "--report", report)
    assert result.exit_code == 0, result.output
    assert "verdict: PASSED (lossy gate: cosine >= 0.99)" in result.output
    assert json.loads(report.read_text())["gates"]["lossy"] == ["cosine >= 0.99"]


# --------------------------------------------------------------------------- the calibrated exact gate


def test_noise_is_measured_from_optimized_onnxruntime_and_scales_the_atol():
    model = deep_conv_net()
    feeds = FeedSet(conv_feeds(4), "test")
    noise = measure_noise(model, feeds, run_model(model, feeds, threads=0), threads=0)
    assert 0 < noise["y"] < 1e-4  # onnxruntime fuses Conv+BatchNorm itself: float rounding, not zero
    atols = exact_atols(noise, Tolerances())
    assert atols["y"] == pytest.approx(4 * noise["y"])
    assert exact_atols({"y": 0.0}, Tolerances())["y"] == 1e-6  # no noise measured: the fixed floor


def test_noise_beyond_rounding_is_capped_at_a_thousandth_of_the_output():
    model = deep_conv_net()
    feeds = FeedSet(conv_feeds(2), "test")
    outputs = run_model(model, feeds, threads=0)
    shifted = {"y": [y + 0.5 for y in outputs["y"]]}  # a "reference" 0.5 away: not float noise
    scale = max(float(np.abs(y).max()) for y in shifted["y"])
    assert measure_noise(model, feeds, shifted, threads=0)["y"] == pytest.approx(1e-3 * scale)


def test_atol_per_output_decides_the_exact_gate():
    ref = {"y": [np.ones(4, np.float32)]}
    moved = {"y": [np.ones(4, np.float32) + 5e-5]}
    assert not compare_outputs(ref, moved, Tolerances(), exact=True).passed
    assert compare_outputs(ref, moved, Tolerances(), exact=True, atols={"y": 1e-4}).passed


def test_batchnorm_folding_on_a_deep_conv_net_passes_the_calibrated_gate(tmp_path):
    data = conv_feeds()
    result = onnxopt.optimize(deep_conv_net(), "fold-batchnorm", data=data, repro_dir=tmp_path / "r")
    assert result.report.passed, result.report.failure
    # its twin: the fixed tolerance alone (1e-5 relative to the output's scale) calls the fold inexact
    fixed = onnxopt.optimize(deep_conv_net(), "fold-batchnorm", data=data, noise_factor=0, repro_dir=tmp_path / "r")
    assert not fixed.report.passed and "not exact: output 'y'" in fixed.report.failure
    assert result.report.steps[0].stats["batchnorms_folded"] == 12
    exact = result.report.gates["exact"]
    assert exact["noise"]["y"] > 0 and exact["atol"]["y"] == pytest.approx(4 * exact["noise"]["y"])
    assert "exact gate: atol = max(1e-06, 4 x float noise) per output; y noise" in result.report.table()


def test_noise_is_measured_only_for_pipelines_with_exact_steps(tmp_path, monkeypatch):
    """A lossy-only pipeline has no exact gate to calibrate: no optimized session (costly on big models)."""
    from onnxopt import manager

    calls = []
    monkeypatch.setattr(manager, "measure_noise", lambda *a, **k: calls.append(1) or {"y": 0.0})
    data = conv_feeds()
    lossy = onnxopt.optimize(deep_conv_net(), "prune(sparsity=0.1)", data=data, min_cosine=0, repro_dir=tmp_path / "r")
    assert lossy.report.passed and calls == [] and lossy.report.gates["exact"] is None
    assert "exact gate" not in lossy.report.table()
    exact = onnxopt.optimize(deep_conv_net(), "prune(sparsity=0.1),dce", data=data, min_cosine=0,
                             repro_dir=tmp_path / "r")
    assert exact.report.passed and calls == [1] and exact.report.gates["exact"]["noise"] == {"y": 0.0}


@pytest.mark.parametrize("wrong", [_SignFlip, _WrongChannel, _EpsilonDropped])
def test_wrong_folds_fail_the_calibrated_gate(wrong, tmp_path, test_passes):
    result = onnxopt.optimize(deep_conv_net(), wrong.name, data=conv_feeds(), repro_dir=tmp_path / "r")
    assert not result.report.passed
    assert result.report.failure.startswith(f"step 1 '{wrong.name}': not exact: output 'y'")


# --------------------------------------------------------------------------- validation cost and bisecting


@pytest.fixture
def counted_runs(monkeypatch):
    calls = []

    def counting(model, feeds, **options):
        calls.append(len(feeds))
        return run_model(model, feeds, **options)

    monkeypatch.setattr(manager, "run_model", counting)
    return calls


def test_a_run_of_exact_steps_costs_one_validation_run(counted_runs):
    feeds = {"x": np.random.default_rng(0).standard_normal((20, 2, 8)).astype(np.float32)}
    result = onnxopt.optimize(mlp(with_dead_branch=True), "cleanup", data=feeds)
    assert result.report.passed
    assert counted_runs == [20, 20]  # the original, then the final model (noise runs are validate's own)
    records = result.report.steps
    assert all(r.vs_previous is None and r.checks["onnxruntime"] == f"validated with step {len(records)}"
               for r in records[:-1])
    assert records[-1].vs_previous["passed"] and records[-1].vs_original["samples"] == 20


def test_exact_steps_before_a_lossy_step_are_checked_on_a_subset(counted_runs, tmp_path):
    feeds = {"x": np.random.default_rng(0).standard_normal((20, 2, 8)).astype(np.float32)}
    result = onnxopt.optimize(mlp(with_dead_branch=True), "dce,lift-constants,prune(sparsity=0.3),dce",
                              data=feeds, min_cosine=0, repro_dir=tmp_path / "r")
    assert result.report.passed, result.report.failure
    assert counted_runs == [20, manager.EXACT_SUBSET, 20, 20]
    assert result.report.steps[1].vs_original["samples"] == manager.EXACT_SUBSET


def test_a_failing_run_is_bisected_to_the_culprit_with_its_reproducer(tmp_path, test_passes):
    repro = tmp_path / "repro"
    result = onnxopt.optimize(mlp(with_dead_branch=True), "dce,lift-constants,scale-weights-test,remove-noops,cse",
                              repro_dir=repro)
    report = result.report
    assert report.failure.startswith("step 3 'scale-weights-test': not exact: output 'y'")
    assert [s.name for s in report.steps] == ["dce", "lift-constants", "scale-weights-test"]
    assert not report.steps[-1].passed and report.steps[-1].checks["onnxruntime"].startswith("bisected: steps 1-5")
    assert (repro / "pipeline.txt").read_text().strip() == "scale-weights-test"
    before = onnx.load(str(repro / "model.onnx"))  # after dce: the dead branch is gone, w2 unscaled
    assert len(before.graph.node) == 4
    np.testing.assert_array_equal(WeightStore(before.graph).array("w2"), WeightStore(mlp().graph).array("w2"))
    scaled = WeightStore(result.model.graph).array("w2")  # the model returned is the culprit's result
    np.testing.assert_allclose(scaled, WeightStore(mlp().graph).array("w2") * 1.01, rtol=1e-6)


def test_a_crash_inside_a_run_leaves_the_model_before_it(tmp_path, test_passes):
    repro = tmp_path / "repro"
    with pytest.raises(onnxopt.ValidationError, match="step 3 'crash-late-test' crashed: RuntimeError: boom"):
        onnxopt.optimize(mlp(with_dead_branch=True), "dce,lift-constants,crash-late-test", repro_dir=repro)
    assert len(onnx.load(str(repro / "model.onnx")).graph.node) == 4  # dce's result, replayed


def test_a_checker_failure_inside_a_run_is_bisected_too(tmp_path, test_passes):
    report = onnxopt.optimize(mlp(with_dead_branch=True), "dce,invalid-node-test,lift-constants,cse",
                              repro_dir=tmp_path / "r").report
    assert report.failure.startswith("step 2 'invalid-node-test': ONNX checker:")
    assert [s.name for s in report.steps] == ["dce", "invalid-node-test"]
    assert report.steps[0].checks["checker"] == "ok"  # the bisection checked dce's model alone


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(["dce", "lift-constants", "remove-noops", "cse"]), min_size=1, max_size=6),
       st.data())
def test_bisection_names_the_wrong_step_wherever_it_is(exact_steps, data):
    position = data.draw(st.integers(0, len(exact_steps)))
    steps = [*exact_steps[:position], "scale-weights-test", *exact_steps[position:]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.PASSES, _ScaleWeights.name, _ScaleWeights)
        with tempfile.TemporaryDirectory() as repro:
            report = onnxopt.optimize(mlp(with_dead_branch=True), ",".join(steps), repro_dir=repro).report
    assert report.failure.startswith(f"step {position + 1} 'scale-weights-test': not exact")
    assert len(report.steps) == position + 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "ppocr_cls", "minilm_l3"])
def test_cleanup_passes_on_the_shared_models_with_their_noise_reported(shared_models, name):
    folder = shared_models / name
    if not (folder / "model.onnx").exists():
        pytest.skip(f"{name} is absent")
    report = onnxopt.optimize(folder / "model.onnx", "cleanup", data=folder / "eval.npz").report
    assert report.passed, report.failure
    exact = report.gates["exact"]
    assert set(exact["noise"]) == {o.name for o in onnx.load(folder / "model.onnx", load_external_data=False).graph.output}
    assert all(exact["atol"][n] == max(1e-6, 4 * exact["noise"][n]) for n in exact["noise"])
    assert report.steps[-1].vs_previous["passed"] and report.steps[-1].vs_original["samples"] == report.feeds["samples"]
