"""The Python API; the CLI calls exactly these functions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx

from .benchmark import Benchmark, benchmark
from .data import as_feeds, check_input_shapes, load_labels
from .errors import InputError
from .executor import Executor, make_executor
from .manager import Result, run_pipeline
from .modelio import check_output_path, copy_model, load_model, model_tensors, save_model, write_file_atomically
from .tensors import is_external, tensor_nbytes
from .pipeline import Step
from .report import layer_table, model_info
from .report_html import render_html
from .synthetic import synthetic_reference
from .validate import (DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_COSINE, NOISE_FACTOR, Comparison, Tolerances,
                       compare_outputs, run_model, task_accuracy)

ModelLike = onnx.ModelProto | str | os.PathLike
LAYER_COMPARE_LIMIT = 256 * 2**20  # inputs up to this size (external data included) are compared layer by layer with the result


def _owned_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """A model this call may change: loaded from a path, or a copy of the caller's proto."""
    if isinstance(model, onnx.ModelProto):
        return copy_model(model), None
    return load_model(model), Path(model)


def optimize(
    model: ModelLike,
    pipeline: str | list[Step],
    *,
    output: str | os.PathLike | None = None,
    data: Any = None,
    labels: Any = None,
    calib: Any = None,
    validate: bool = True,
    min_cosine: float | None = None,
    max_abs: float | None = None,
    max_accuracy_drop: float | None = None,
    exact_rtol: float = 1e-5,
    exact_atol: float = 1e-6,
    noise_factor: float = NOISE_FACTOR,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calib_cache: str | os.PathLike | None = None,
    repro_dir: str | os.PathLike | None = None,
    keep_failed: bool = False,
    overwrite_input: bool = False,
    external_data: bool | None = None,
    progress: bool = False,
    bench: bool = False,
    bench_runs: int = 50,
    executor: str | Executor = "in-process",
    ray_address: str | None = None,
    workers: int | None = None,
) -> Result:
    """Run a pipeline; validate every step; write ``output`` only if every step passed (or ``keep_failed``).

    ``data`` feeds validation and ``calib`` feeds calibrating passes: an .npz path, a folder of
    ONNX test data, a mapping of sample-major arrays, or an iterable of feed dicts; ``labels``
    (one class per validation sample) adds task accuracy to the report. The caller's
    model object and input file are never changed. Check ``result.report.passed``; a failing
    step leaves a reproducer in ``repro_dir`` (default: a new temporary folder), named by
    ``result.report.reproducer``.

    Lossy gates, judged after each run of consecutive lossy steps: with ``labels``, top-1 accuracy
    may fall at most ``max_accuracy_drop`` points (None: 1 point; 100: off; needs ``labels``); every output's cosine to the original
    must stay >= ``min_cosine`` (None: 0.99 without labels, no cosine gate with them; 0 relaxes it).
    Exact steps stay within ``exact_rtol`` and an atol of ``noise_factor`` times the model's
    measured float noise (at least ``exact_atol``).
    The report gets a per-layer table of the result (sparsity, weight change vs the input), and with
    ``bench`` the original's and the result's onnxruntime latency (``bench_runs`` interleaved runs).

    With external data, the weights the pipeline rewrote are written once, straight to the
    output's data file, and ``result.model`` reads them from there afterwards.

    ``executor="ray"`` runs validation and calibration statistics over shards of the data on Ray
    workers (``pip install "onnxopt[ray]"``): a local Ray instance with ``workers`` CPUs, or the
    cluster at ``ray_address`` (``"auto"`` or ``HOST:PORT``); workers send back metric sums, never
    outputs. An :class:`onnxopt.executor.Executor` instance is used as it is (and not closed).
    """
    out_path = Path(output) if output is not None else None
    if out_path is not None and not isinstance(model, onnx.ModelProto):
        check_output_path(out_path, model, overwrite_input)
    if max_accuracy_drop is not None and labels is None:
        raise InputError("--max-accuracy-drop needs --labels (class labels of the validation samples)")
    if calib_cache is not None and not Path(calib_cache).parent.is_dir():
        raise InputError(f"--calib-cache: folder does not exist: {Path(calib_cache).parent}")
    if min_cosine is None and labels is None:
        min_cosine = DEFAULT_MIN_COSINE
    if max_accuracy_drop is None and labels is not None:
        max_accuracy_drop = DEFAULT_MAX_ACCURACY_DROP
    tolerances = Tolerances(exact_rtol, exact_atol, min_cosine, max_abs, max_accuracy_drop, noise_factor)
    owned, input_path = _owned_model(model)
    check_input_shapes(owned, input_shapes)
    original = model if input_path is None else _small_original(owned, input_path)
    runner = make_executor(executor, ray_address, workers)
    try:
        result = run_pipeline(
            owned, pipeline, data=data, labels=labels, calib=calib, validate=validate,
            tolerances=tolerances, input_shapes=input_shapes,
            calib_cache=calib_cache, repro_dir=repro_dir, input_path=input_path, progress=progress,
            teacher=(lambda: model) if input_path is None else (lambda: load_model(input_path)), executor=runner,
        )
        if runner is not None:
            result.report.executor = {**(result.report.executor or {}), **runner.describe()}
    finally:
        if runner is not None and runner is not executor:
            runner.close()
    result.report.layers = layer_table(result.model, original)
    if bench and result.report.passed:
        result.report.latency = benchmark({"original": model if input_path is None else input_path,
                                           "result": result.model}, data=data, input_shapes=input_shapes,
                                          runs=bench_runs).to_dict()
    if out_path is not None and (result.report.passed or keep_failed):
        save_model(result.model, out_path, external=external_data, input_path=input_path,
                   overwrite_input=overwrite_input, move_spill=True)
        result.report.output = str(out_path)
    return result


def _small_original(owned: onnx.ModelProto, path: Path) -> onnx.ModelProto | None:
    """A copy of the input (the pipeline changes ``owned`` in place) for the per-layer comparison, unless
    the model is too big to hold twice or to read its weights once more (external data counts); copying
    is ten times faster than reading it again."""
    external = sum(tensor_nbytes(t) for t in model_tensors(owned) if is_external(t))
    return copy_model(owned) if path.stat().st_size + external <= LAYER_COMPARE_LIMIT else None


def compare(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    data: Any = None,
    labels: Any = None,
    min_cosine: float | None = None,
    max_abs: float | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[Comparison, dict[str, Any]]:
    """Run both models on the same feeds; per-output metrics and a verdict against the thresholds."""
    ref_model = reference if isinstance(reference, onnx.ModelProto) else load_model(reference)
    cand_model = candidate if isinstance(candidate, onnx.ModelProto) else load_model(candidate)
    check_input_shapes(ref_model, input_shapes)
    tolerances = Tolerances(min_cosine=min_cosine, max_abs=max_abs)
    if data is not None:
        feeds, notes = as_feeds(data, ref_model), []
        reference = run_model(ref_model, feeds)
    else:
        feeds, notes, reference = synthetic_reference(ref_model, input_shapes)
    candidate = run_model(cand_model, feeds)
    comparison = compare_outputs(reference, candidate, tolerances, exact=False)
    details = {"origin": feeds.origin, "samples": len(feeds), "notes": notes}
    if labels is not None:
        labels = load_labels(labels, len(feeds))
        details["accuracy"] = {"reference": task_accuracy(reference, labels),
                               "candidate": task_accuracy(candidate, labels)}
    return comparison, details


def info(model: ModelLike) -> dict[str, Any]:
    """Opset, interface, op histogram, parameters, bytes, sparsity, subgraphs, external data."""
    if isinstance(model, onnx.ModelProto):
        return model_info(model)
    return model_info(load_model(model), model)


def bench(
    models: list[ModelLike],
    *,
    data: Any = None,
    threads: int = 1,
    runs: int = 50,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Benchmark:
    """onnxruntime CPU latency (median, p10/p90, runs interleaved), throughput, file size and session peak
    memory of each model, with ratios to the first: see :mod:`onnxopt.benchmark`."""
    return benchmark(models, data=data, threads=threads, runs=runs, input_shapes=input_shapes)


def report_html(report: str | os.PathLike | dict[str, Any], output: str | os.PathLike) -> None:
    """Render a JSON report (a path, or ``Report.to_dict()``) as one self-contained HTML page at ``output``."""
    if not isinstance(report, dict):
        path = Path(report)
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"report file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a JSON report ({exc})") from None
        if not isinstance(report, dict) or not isinstance(report.get("steps"), list) or "pipeline" not in report:
            raise InputError(f"{path}: not an onnxopt report (no 'pipeline' and 'steps')")
    try:
        page = render_html(report)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not an onnxopt report: {exc.__class__.__name__}: {exc}") from None
    write_file_atomically(output, page.encode())
