import math

import numpy as np
import pytest

from onnxopt.validate import Tolerances, check_interface, compare_outputs, output_metrics

from conftest import mlp, value


def test_metrics_on_known_values():
    ref = [np.array([[3.0, 4.0]], np.float32)]
    cand = [np.array([[3.0, 4.5]], np.float32)]
    m = output_metrics(ref, cand, Tolerances())
    assert m.max_abs == pytest.approx(0.5)
    assert m.max_rel == pytest.approx(0.125)
    assert m.rel_l2 == pytest.approx(0.5 / 5)
    assert m.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert m.snr_db == pytest.approx(20 * math.log10(5 / 0.5))
    assert m.top1_agreement == 1.0
    assert m.mismatches == 1 and not m.within_exact_tolerance


def test_identical_outputs_are_exact():
    ref = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    m = output_metrics(ref, [r.copy() for r in ref], Tolerances())
    assert (m.max_abs, m.cosine, m.snr_db, m.mismatches) == (0.0, 1.0, math.inf, 0)


def test_top1_counts_disagreeing_rows():
    ref = [np.array([[1.0, 0.0], [0.0, 1.0]])]
    cand = [np.array([[1.0, 0.0], [1.0, 0.0]])]
    assert output_metrics(ref, cand, Tolerances()).top1_agreement == 0.5


def test_exact_gate_fails_beyond_tolerance_and_passes_within():
    ref = {"y": [np.ones(4, np.float32)]}
    near = {"y": [np.ones(4, np.float32) * (1 + 1e-7)]}
    far = {"y": [np.ones(4, np.float32) * 1.001]}
    assert compare_outputs(ref, near, Tolerances(), exact=True).passed
    failed = compare_outputs(ref, far, Tolerances(), exact=True)
    assert not failed.passed and "4 values outside" in failed.failures[0]
    assert compare_outputs(ref, far, Tolerances(), exact=False).passed


def test_lossy_thresholds_gate_cosine_and_max_abs():
    ref = {"y": [np.array([1.0, 2.0, 3.0])]}
    cand = {"y": [np.array([1.0, 2.0, 2.0])]}
    assert not compare_outputs(ref, cand, Tolerances(min_cosine=0.999), exact=False).passed
    assert compare_outputs(ref, cand, Tolerances(min_cosine=0.9), exact=False).passed
    assert not compare_outputs(ref, cand, Tolerances(max_abs=0.5), exact=False).passed
    assert compare_outputs(ref, cand, Tolerances(max_abs=1.0), exact=False).passed


def test_interface_check_catches_renames_dtype_and_rank_changes():
    a = mlp()
    assert check_interface(a, mlp()) == []
    renamed = mlp()
    renamed.graph.output[0].name = "z"
    assert "graph outputs changed" in check_interface(a, renamed)[0]
    recast = mlp()
    recast.graph.input[0].CopyFrom(value("x", ["batch", 8], dtype=10))
    assert "changed dtype" in check_interface(a, recast)[0]
    reranked = mlp()
    reranked.graph.input[0].CopyFrom(value("x", ["batch", 8, 1]))
    assert "changed rank" in check_interface(a, reranked)[0]


def test_sequence_of_map_outputs_are_compared_by_their_values():
    ref = [[{0: 0.25, 1: 0.75}], [{0: 0.5, 1: 0.5}]]
    same = output_metrics(ref, [[{0: 0.25, 1: 0.75}], [{0: 0.5, 1: 0.5}]], Tolerances())
    assert same.within_exact_tolerance and same.cosine == pytest.approx(1.0)
    moved = output_metrics(ref, [[{0: 0.75, 1: 0.25}], [{0: 0.5, 1: 0.5}]], Tolerances())
    assert moved.mismatches == 2 and moved.max_abs == pytest.approx(0.5)


def test_string_outputs_are_compared_for_equality():
    ref = [np.array(["a", "b"])]
    assert output_metrics(ref, [np.array(["a", "b"])], Tolerances()).within_exact_tolerance
    different = output_metrics(ref, [np.array(["a", "c"])], Tolerances())
    assert different.mismatches == 1 and not different.within_exact_tolerance


def test_an_ulp_of_float16_is_exact_but_not_the_same_step_in_float32():
    """float16 results computed in another order differ by an ulp (~1e-3 relative): as exact as float16 gets."""
    ref = [np.array([0.3, -1.7, 2.5, 0.01], np.float16)]
    cand = [np.nextafter(ref[0], np.float16(10))]  # one ulp up, every element
    assert output_metrics(ref, cand, Tolerances()).mismatches == 0
    as32 = ([ref[0].astype(np.float32)], [cand[0].astype(np.float32)])
    assert output_metrics(*as32, Tolerances()).mismatches > 0


def test_big_models_are_validated_without_prepacking_and_the_gates_still_hold(tmp_path, monkeypatch):
    """Above PREPACK_LIMIT, validation sessions leave the weights unpacked (a multi-GB model opens in
    milliseconds); single and joined runs may then take different kernels, and the exact gate,
    calibrated on the measured float noise, still passes an exact pass; the lossy gate still fails."""
    import onnxopt
    from onnxopt import validate
    from onnxopt.modelio import save_model

    model = mlp(hidden=512, with_dead_branch=True)
    assert validate.validation_prepack(model)
    session = validate.Session(model, prepack=False)
    assert session.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    monkeypatch.setattr(validate, "PREPACK_LIMIT", 1024)
    assert not validate.validation_prepack(model)
    path = tmp_path / "in.onnx"
    save_model(model, path, external=True)
    assert onnxopt.optimize(path, "dce").report.passed
    scaled = onnxopt.optimize(path, "prune(sparsity=0.5)", min_cosine=0.999999)
    assert not scaled.report.passed and "cosine" in scaled.report.failure
