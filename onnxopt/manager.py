"""The pass manager: run each step, verify it, compare it, record it; leave a reproducer on failure.

After every step: the ONNX checker (full), the interface check, and, when validating, an
onnxruntime run on the validation feeds compared with the previous step (exact passes are
gated near bit-exactness) and with the original (lossy passes gated by user thresholds).
Outputs are kept, models are not: the original model is never copied.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .data import FeedSet, as_feeds, load_labels
from .errors import InputError, OnnxoptError, ValidationError
from .modelio import has_external_data, needs_file, save_scratch
from .passes.base import PassContext
from .pipeline import Step, format_pipeline, format_step, parse_pipeline
from .report import Report, StepRecord, size_summary
from .synthetic import synthetic_reference
from .validate import (
    Tolerances, check_interface, check_structure, compare_outputs, run_model, task_accuracy,
)

REPRO_COPY_LIMIT = 256 * 2**20  # models up to this size are kept (serialized) before each step for a reproducer


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report


def run_pipeline(
    model: onnx.ModelProto,
    pipeline: str | list[Step],
    *,
    data=None,
    labels=None,
    calib=None,
    validate: bool = True,
    tolerances: Tolerances = Tolerances(),
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calib_cache: str | Path | None = None,
    repro_dir: str | Path | None = None,
    input_path: str | Path | None = None,
    progress: bool = False,
    teacher=None,
) -> Result:
    """Run ``pipeline`` on ``model`` (changed in place: the caller passes a model it owns).

    ``teacher`` returns the original model for passes that repair against it (loaded on demand).
    """
    steps = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    report = Report(pipeline=format_pipeline(steps), input=str(input_path) if input_path else None)
    original_interface = _interface_copy(model)
    calib_feeds = as_feeds(calib, model) if calib is not None else None
    context = PassContext(calib=calib_feeds, calib_cache=Path(calib_cache) if calib_cache else None,
                          progress=progress, teacher=teacher)
    _check_input(model)
    validation = (_Validation.start(model, data if data is not None else calib_feeds, labels, input_shapes, tolerances,
                                    report, from_calib=data is None and calib_feeds is not None)
                  if validate else None)
    feeds = validation.feeds if validation else None
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as scratch:
        for index, step in enumerate(steps, start=1):
            before_bytes = _snapshot(model) if validate else None
            before = report.steps[-1].after if report.steps else size_summary(model)
            pass_ = step.pass_type(step.options, context)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except OnnxoptError as exc:
                raise type(exc)(f"step {index} '{step.name}': {exc}") from None
            except Exception as exc:
                report.failure = f"step {index} '{step.name}' crashed: {exc.__class__.__name__}: {exc}"
                report.reproducer = _write_reproducer(repro_dir, steps, index, before_bytes, feeds, calib_feeds,
                                                      input_path, traceback.format_exc(), tolerances, validation)
                raise ValidationError(report.failure + (f" (reproducer: {report.reproducer})" if report.reproducer else "")) from exc
            seconds = time.perf_counter() - start
            model = result.model
            record = StepRecord(index, step.name, format_step(step), dataclasses.asdict(step.options), pass_.exact,
                                round(seconds, 6), result.modified,
                                before, size_summary(model), dict(result.stats), details=dict(result.details))
            report.steps.append(record)
            problems = _verify(model, original_interface, Path(scratch) / f"step{index}.onnx", record)
            if validation and not problems:
                problems += validation.check(model, record, pass_.exact)
            if problems:
                record.passed = False
                report.failure = f"step {index} '{step.name}': " + "; ".join(problems)
                report.reproducer = _write_reproducer(repro_dir, steps, index, before_bytes, feeds, calib_feeds,
                                                      input_path, None, tolerances, validation, pass_.exact)
                return Result(model, report)
    return Result(model, report)


@dataclass
class _Validation:
    """onnxruntime runs of each step on the validation feeds, against the previous step and the original."""

    feeds: FeedSet
    reference: dict[str, list[np.ndarray]]
    previous: dict[str, list[np.ndarray]]
    tolerances: Tolerances
    labels: np.ndarray | None = None
    reference_accuracy: float | None = None

    @classmethod
    def start(cls, model, data, labels, input_shapes, tolerances: Tolerances, report: Report,
              from_calib: bool = False) -> _Validation:
        """Feeds (given, the calibration samples, or synthetic) and the original's outputs, computed once."""
        if data is None:
            feeds, notes, reference = synthetic_reference(model, input_shapes)
        else:
            feeds = as_feeds(data, model)
            notes = []
            try:
                reference = run_model(model, feeds)
            except InputError as exc:
                raise InputError(f"the input model cannot run on {feeds.origin}: {exc} "
                                 "(--no-validate skips onnxruntime)") from None
        origin = f"--calib {feeds.origin}, as no --data was given" if from_calib else feeds.origin
        report.feeds = {"origin": origin, "samples": len(feeds), "notes": notes}
        validation = cls(feeds, reference, reference, tolerances)
        if labels is not None:
            validation.labels = load_labels(labels, len(feeds))
            validation.reference_accuracy = task_accuracy(reference, validation.labels)
            report.feeds["accuracy"] = validation.reference_accuracy
        return validation

    def check(self, model: onnx.ModelProto, record: StepRecord, exact: bool) -> list[str]:
        """Record the step's metrics; the reasons it fails its gates (exact: vs previous; all: vs original)."""
        tol = self.tolerances
        outputs = run_model(model, self.feeds)
        vs_previous = compare_outputs(self.previous, outputs, tol if exact else Tolerances(), exact=exact)
        vs_original = compare_outputs(self.reference, outputs, Tolerances(min_cosine=tol.min_cosine,
                                                                          max_abs=tol.max_abs), exact=False)
        record.vs_previous, record.vs_original = vs_previous.to_dict(), vs_original.to_dict()
        problems = [f"not exact: {f}" for f in vs_previous.failures] if exact else []
        problems += vs_original.failures
        if self.labels is not None:
            record.accuracy = task_accuracy(outputs, self.labels)
            drop = 100 * (self.reference_accuracy - record.accuracy)
            if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop:
                problems.append(f"accuracy {record.accuracy:.2%} is {drop:.2f} points below the original's "
                                f"{self.reference_accuracy:.2%} (max-accuracy-drop {tol.max_accuracy_drop})")
        self.previous = outputs
        return problems


def _interface_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Just the graph's inputs, outputs and initializer names: what the interface check compares."""
    copy = onnx.ModelProto()
    copy.graph.input.extend(model.graph.input)
    copy.graph.output.extend(model.graph.output)
    initializers = {t.name for t in model.graph.initializer}
    copy.graph.initializer.extend(onnx.TensorProto(name=v.name) for v in model.graph.input if v.name in initializers)
    return copy


def _check_input(model: onnx.ModelProto) -> None:
    """Every step must pass the full checker: an input that already fails it is the input's fault, said up front."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as scratch:
        path = Path(scratch) / "input.onnx" if needs_file(model) else None
        if path is not None:
            save_scratch(model, path, placeholders=True)
        complaint = check_structure(model, path)
    if complaint:
        raise InputError(f"the input model fails the ONNX checker with shape inference (every step is held to "
                         f"it, so none could pass): {complaint}")


def _verify(model: onnx.ModelProto, original: onnx.ModelProto, scratch_path: Path, record: StepRecord) -> list[str]:
    """Checker and interface check; a big or external model is checked from a file, as the checker needs."""
    problems = check_interface(original, model)
    if needs_file(model):
        save_scratch(model, scratch_path, placeholders=True)
        complaint = check_structure(model, scratch_path)
    else:
        complaint = check_structure(model)
    record.checks = {"checker": complaint or "ok", "interface": "; ".join(problems) or "ok"}
    if complaint:
        problems.append(f"ONNX checker: {complaint}")
    return problems


def _snapshot(model: onnx.ModelProto) -> bytes | None:
    """The model before a step, for a reproducer, when that is cheap enough to keep."""
    if has_external_data(model) or model.ByteSize() > REPRO_COPY_LIMIT:
        return None
    return model.SerializeToString()


def _gate_arguments(tolerances: Tolerances) -> list[str]:
    """The command-line options that set ``tolerances`` where they differ from the defaults."""
    defaults = Tolerances()
    arguments = []
    for gate in dataclasses.fields(Tolerances):
        given = getattr(tolerances, gate.name)
        if given is not None and given != getattr(defaults, gate.name):
            arguments += [f"--{gate.name.replace('_', '-')}", repr(given)]
    return arguments


def _write_reproducer(
    repro_dir, steps: list[Step], index: int, before: bytes | None, feeds: FeedSet | None,
    calib: FeedSet | None, input_path, trace: str | None, tolerances: Tolerances = Tolerances(),
    validation: _Validation | None = None, exact: bool = True,
) -> str | None:
    """A folder that replays the failing step with the same feeds and gates: model before it, one-step
    pipeline, command. A lossy step after others is gated against the original, so it replays from the
    input. Without ``repro_dir``: a new temporary folder (never the current directory)."""
    try:
        folder = Path(repro_dir) if repro_dir else Path(tempfile.mkdtemp(prefix="onnxopt-repro-"))
        folder.mkdir(parents=True, exist_ok=True)
        # Too big to keep a copy, or gated against the original: replay every step up to the failing one.
        if input_path is not None and (before is None or (not exact and index > 1)):
            model_arg, pipeline = str(Path(input_path).resolve()), format_pipeline(steps[:index])
        elif before is not None:
            model_arg, pipeline = "model.onnx", format_step(steps[index - 1])
            (folder / "model.onnx").write_bytes(before)
        else:
            return None
        (folder / "pipeline.txt").write_text(pipeline + "\n")
        command = ["onnxopt", "optimize", model_arg, "-o", "replayed.onnx", "-p", pipeline, *_gate_arguments(tolerances)]
        if validation is not None and validation.labels is not None:
            np.savez(folder / "labels.npz", labels=validation.labels)
            command += ["--labels", "labels.npz"]
        for name, feed_set in (("feeds", feeds), ("calib", calib)):
            if feed_set is not None:
                np.savez(folder / f"{name}.npz", **feed_set.arrays)
                command += ["--data" if name == "feeds" else "--calib", f"{name}.npz"]
        (folder / "command.sh").write_text("#!/bin/sh\ncd \"$(dirname \"$0\")\"\n" + shlex.join(command) + "\n")
        if trace:
            (folder / "traceback.txt").write_text(trace)
    except OSError:
        return None
    return str(folder)

