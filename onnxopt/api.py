"""The Python API; the CLI calls exactly these functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from .data import as_feeds, load_labels, random_feeds
from .manager import Result, run_pipeline
from .modelio import check_output_path, copy_model, load_model, save_model
from .pipeline import Step
from .report import model_info
from .validate import (DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_COSINE, NOISE_FACTOR, Comparison, Tolerances,
                       compare_outputs, run_model, task_accuracy)

ModelLike = onnx.ModelProto | str | os.PathLike


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
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP,
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
) -> Result:
    """Run a pipeline; validate every step; write ``output`` only if every step passed (or ``keep_failed``).

    ``data`` feeds validation and ``calib`` feeds calibrating passes: an .npz path, a folder of
    ONNX test data, a mapping of sample-major arrays, or an iterable of feed dicts; ``labels``
    (one class per validation sample) adds task accuracy to the report. The caller's
    model object and input file are never changed. Check ``result.report.passed``.

    Lossy gates, judged after each run of consecutive lossy steps: with ``labels``, top-1 accuracy
    may fall at most ``max_accuracy_drop`` points (100: off); every output's cosine to the original
    must stay >= ``min_cosine`` (None: 0.99 without labels, no cosine gate with them; 0 relaxes it).
    Exact steps stay within ``exact_rtol`` and an atol of ``noise_factor`` times the model's
    measured float noise (at least ``exact_atol``).
    """
    out_path = Path(output) if output is not None else None
    if out_path is not None and not isinstance(model, onnx.ModelProto):
        check_output_path(out_path, model, overwrite_input)
    owned, input_path = _owned_model(model)
    if min_cosine is None and labels is None:
        min_cosine = DEFAULT_MIN_COSINE
    result = run_pipeline(
        owned, pipeline, data=data, labels=labels, calib=calib, validate=validate,
        tolerances=Tolerances(exact_rtol, exact_atol, min_cosine, max_abs, max_accuracy_drop, noise_factor),
        input_shapes=input_shapes,
        calib_cache=calib_cache, repro_dir=repro_dir, input_path=input_path, progress=progress,
        teacher=(lambda: model) if input_path is None else (lambda: load_model(input_path)),
    )
    if out_path is not None and (result.report.passed or keep_failed):
        save_model(result.model, out_path, external=external_data, input_path=input_path,
                   overwrite_input=overwrite_input)
        result.report.output = str(out_path)
    return result


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
    if data is not None:
        feeds, notes = as_feeds(data, ref_model), []
    else:
        feeds, notes = random_feeds(ref_model, input_shapes=input_shapes)
    reference, candidate = run_model(ref_model, feeds), run_model(cand_model, feeds)
    comparison = compare_outputs(reference, candidate, Tolerances(min_cosine=min_cosine, max_abs=max_abs), exact=False)
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
