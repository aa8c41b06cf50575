"""The pass manager: run each step, verify it, compare it, record it; leave a reproducer on failure.

The ONNX checker (full) and the interface check run after every lossy step and, with validation,
once per run of consecutive exact steps, with the onnxruntime run that validates them together
against the last validated outputs (the exact gate, calibrated to the model's float noise); only
when that fails are the steps replayed from the last validated model to bisect to the culprit. A run of exact steps
followed by a lossy step is checked on the first ``EXACT_SUBSET`` samples; lossy steps and the final
model are checked on every sample, against the original (lossy gates) and, for a final run of exact
steps, against the last validated outputs (exact gate). The original model is never copied; the last
validated model is kept serialized (when it is small enough) to bisect and for the reproducer.
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
from .executor import Executor
from .modelio import has_external_data, needs_file, save_scratch, serialized_size_above
from .passes.base import PassContext
from .pipeline import Step, format_pipeline, format_step, parse_pipeline
from .report import Report, StepRecord, size_summary
from .sharded import WORKER_THREADS, ShardedValidation, Validated
from .synthetic import synthetic_reference
from .validate import (
    VALIDATION_THREADS, Comparison, Tolerances, check_interface, check_structure, compare_outputs, exact_atols,
    measure_noise, run_model, task_accuracy, validation_prepack,
)

REPRO_COPY_LIMIT = 256 * 2**20  # models up to this size are kept (serialized) to bisect and for a reproducer
EXACT_SUBSET = 8  # samples a run of exact steps is checked on when a lossy step (checked on all) follows


@dataclass
class Result:
    model: onnx.ModelProto
    report: Report


@dataclass
class _Run:
    """Exact steps since the last validated model (``start``: that model serialized, None when too big)."""

    start: bytes | None
    steps: list[tuple[Step, StepRecord]] = dataclasses.field(default_factory=list)


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
    executor: Executor | None = None,
) -> Result:
    """Run ``pipeline`` on ``model`` (changed in place: the caller passes a model it owns).

    ``teacher`` returns the original model for passes that repair against it (loaded on demand).
    ``executor``: validation and calibration statistics run over shards through it (workers reduce
    to metric sums); None keeps every output in this process, as before.
    """
    steps = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    report = Report(pipeline=format_pipeline(steps), input=str(input_path) if input_path else None)
    original_interface = _interface_copy(model)
    calib_feeds = as_feeds(calib, model) if calib is not None else None
    context = PassContext(calib=calib_feeds, calib_cache=Path(calib_cache) if calib_cache else None,
                          progress=progress, teacher=teacher, executor=executor)
    _check_input(model, input_path)
    validation = (_Validation.start(model, data if data is not None else calib_feeds, labels, input_shapes, tolerances,
                                    report, from_calib=data is None and calib_feeds is not None,
                                    exact_steps=any(step.pass_type.exact for step in steps),
                                    executor=executor, progress=progress, input_path=input_path)
                  if validate else None)
    feeds = validation.feeds if validation else None
    report.gates = _gates(steps, tolerances, validation)
    pending = _Run(None)
    lossy_from = 0  # first step of the current run of consecutive lossy steps

    def fail(index: int, message: str, before: bytes | None, trace: str | None = None, exact: bool = True) -> None:
        report.failure = f"step {index} '{steps[index - 1].name}'{message}"
        report.reproducer = _write_reproducer(repro_dir, steps, index, before, feeds, calib_feeds, input_path, trace,
                                              tolerances, validation, exact)

    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as scratch:

        def verify(candidate: onnx.ModelProto, checked: StepRecord) -> list[str]:
            return _verify(candidate, original_interface, Path(scratch) / f"step{checked.index}.onnx", checked)

        for index, step in enumerate(steps, start=1):
            if validate and not pending.steps:
                pending = _Run(_snapshot(model))
            before = report.steps[-1].after if report.steps else size_summary(model)
            pass_ = step.pass_type(step.options, context)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except OnnxoptError as exc:
                raise type(exc)(f"step {index} '{step.name}': {exc}") from None
            except Exception as exc:
                fail(index, f" crashed: {exc.__class__.__name__}: {exc}", _before(pending, context),
                     traceback.format_exc())
                raise ValidationError(report.failure + (f" (reproducer: {report.reproducer})"
                                                        if report.reproducer else "")) from exc
            seconds = time.perf_counter() - start
            model = result.model
            record = StepRecord(index, step.name, format_step(step), dataclasses.asdict(step.options), pass_.exact,
                                round(seconds, 6), result.modified,
                                before, size_summary(model), dict(result.stats), details=dict(result.details))
            report.steps.append(record)
            last = index == len(steps)
            if validation is not None and pass_.exact:
                pending.steps.append((step, record))
                if not last and pending.start is not None and steps[index].pass_type.exact:
                    continue  # checked and validated with the steps that follow
                culprit = validation.check_exact_run(model, pending, context, verify,
                                                     full=last or pending.start is None)
                if culprit is not None:
                    k, problems, model, before_bytes = culprit
                    del report.steps[k:]
                    report.steps[-1].passed = False
                    fail(k, ": " + "; ".join(problems), before_bytes)
                    return Result(model, report)
                pending = _Run(None)
                continue
            problems = verify(model, record)
            if problems:
                record.passed = False
                fail(index, ": " + "; ".join(problems), _before(pending, context))
                return Result(model, report)
            if validation is not None:
                lossy_from = lossy_from or index
                judged = last or steps[index].pass_type.exact  # consecutive lossy steps are judged together
                problems = validation.check_lossy(model, record, gate=judged)
                if judged and problems and lossy_from < index:
                    problems[-1] += f" (lossy steps {lossy_from}-{index} judged together)"
                if judged:
                    lossy_from = 0
                if problems:
                    record.passed = False
                    fail(index, ": " + "; ".join(problems), pending.start, exact=False)
                    return Result(model, report)
    return Result(model, report)


def _before(pending: _Run, context: PassContext) -> bytes | None:
    """The model before the step now running: the last validated one with the pending exact steps replayed."""
    if pending.start is None or not pending.steps:
        return pending.start
    return _replay(pending.start, [s for s, _ in pending.steps], context).SerializeToString()


def _replay(start: bytes, steps: list[Step], context: PassContext) -> onnx.ModelProto:
    """``start`` with ``steps`` applied again (exact passes are deterministic)."""
    model = onnx.ModelProto.FromString(start)
    for step in steps:
        model = step.pass_type(step.options, context)(model).model
    return model


def _gates(steps: list[Step], tol: Tolerances, validation: _Validation | None) -> dict:
    """The gates this run applies, for the report and the verdict line."""
    if validation is None:
        return {"applied": ["not validated: checker and interface only"]}
    applied = []
    lossy = tol.lossy_gates(validation.labels is not None)
    if any(not s.pass_type.exact for s in steps):
        applied.append(f"lossy gate: {', '.join(lossy) or 'none'}")
    exact = any(s.pass_type.exact for s in steps)
    if exact:
        applied.append(f"exact gate: rtol {tol.exact_rtol:g}, atol >= {tol.noise_factor:g} x float noise")
    return {
        "applied": applied,
        "lossy": lossy,
        "exact": {"rtol": tol.exact_rtol, "min_atol": tol.exact_atol, "noise_factor": tol.noise_factor,
                  "noise_samples": len(validation.subset), "noise": validation.noise, "atol": validation.atols}
        if exact else None,
        "exact_subset": len(validation.subset),
        "threads": VALIDATION_THREADS if validation.sharded is None else WORKER_THREADS,
    }


@dataclass
class _Validation:
    """onnxruntime runs on the validation feeds, against the last validated outputs and the original."""

    feeds: FeedSet
    subset: FeedSet
    # outputs on every sample, held (in-process) or as a Validated model whose workers reduce them (sharded)
    reference: dict[str, list[np.ndarray]] | Validated
    previous: dict[str, list[np.ndarray]] | Validated  # the last validated model's outputs on every sample
    previous_subset: dict[str, list[np.ndarray]] | Validated  # ... on the subset (newer after a subset-checked run)
    tolerances: Tolerances
    noise: dict[str, float]
    atols: dict[str, float]
    labels: np.ndarray | None = None
    reference_accuracy: float | None = None
    sharded: ShardedValidation | None = None
    prepack: bool = True  # onnxruntime packs the weights at load (validation_prepack: not for big models)

    @classmethod
    def start(cls, model, data, labels, input_shapes, tolerances: Tolerances, report: Report,
              from_calib: bool = False, exact_steps: bool = True, executor: Executor | None = None,
              progress: bool = False, input_path: str | Path | None = None) -> _Validation:
        """Feeds (given, the calibration samples, or synthetic), the original's outputs, and its float
        noise, computed once (only for a pipeline with exact steps: nothing else is gated by it, and on
        a multi-GB model it costs one more onnxruntime session); through ``executor``, sums instead of outputs.
        The original runs from ``input_path`` when it came from a file: onnxruntime reads the file
        itself instead of a serialized copy of the model."""
        prepack = validation_prepack(model)
        if data is None:
            feeds, notes, reference = synthetic_reference(model, input_shapes, threads=VALIDATION_THREADS,
                                                          prepack=prepack)
        else:
            feeds, notes, reference = as_feeds(data, model), [], None
        origin = f"--calib {feeds.origin}, as no --data was given" if from_calib else feeds.origin
        report.feeds = {"origin": origin, "samples": len(feeds), "notes": notes}
        subset = feeds.head(min(EXACT_SUBSET, len(feeds)))
        if executor is not None:
            return cls._start_sharded(model, feeds, subset, labels, tolerances, report, executor, progress, exact_steps)
        if reference is None:
            try:
                reference = run_model(model, feeds, threads=VALIDATION_THREADS, join=True, path=input_path,
                                      prepack=prepack)
            except InputError as exc:
                raise InputError(f"the input model cannot run on {feeds.origin}: {exc} "
                                 "(--no-validate skips onnxruntime)") from None
        head = _head(reference, len(subset))
        noise = (measure_noise(model, subset, head, threads=VALIDATION_THREADS, path=input_path, prepack=prepack)
                 if exact_steps else {})
        validation = cls(feeds, subset, reference, reference, head, tolerances, noise, exact_atols(noise, tolerances),
                         prepack=prepack)
        if labels is not None:
            validation.labels = load_labels(labels, len(feeds))
            validation.reference_accuracy = task_accuracy(reference, validation.labels)
            report.feeds["accuracy"] = validation.reference_accuracy
        return validation

    @classmethod
    def _start_sharded(cls, model, feeds, subset, labels, tolerances, report, executor, progress,
                       exact_steps) -> _Validation:
        """The same through ``executor``: workers hold no outputs between checks, only sums come back."""
        labels = None if labels is None else load_labels(labels, len(feeds))
        sharded = ShardedValidation(executor, feeds, len(subset), labels, progress)
        report.executor = sharded.describe()
        try:
            reference, noise, accuracy = sharded.start(model, noise=exact_steps)
        except InputError as exc:
            raise InputError(f"the input model cannot run on {feeds.origin}: {exc} "
                             "(--no-validate skips onnxruntime)") from None
        if accuracy is not None:
            report.feeds["accuracy"] = accuracy
        return cls(feeds, subset, reference, reference, reference, tolerances, noise, exact_atols(noise, tolerances),
                   labels, accuracy, sharded)

    def check_exact_run(self, model: onnx.ModelProto, run: _Run, context: PassContext, verify, *, full: bool):
        """Check (``verify``: checker and interface) and validate a run of exact steps at once
        (``full``: on every sample, else the subset). None when it passes; else (culprit step index,
        problems, model after it, model before it serialized), found by replaying the run from its
        start and bisecting."""
        previous = self.previous if full else self.previous_subset

        def check(candidate, record):
            problems = verify(candidate, record)
            return ((None, None), problems) if problems else self._check_exact(candidate, full, previous, record)

        (outputs, accuracy), problems = check(model, run.steps[-1][1])
        if not problems:
            if full:
                self._accuracy(accuracy, run.steps[-1][1])
                self.previous = outputs
            self.previous_subset = _head(outputs, len(self.subset))
            for _, record in run.steps[:-1]:
                record.checks = {check: f"validated with step {run.steps[-1][1].index}"
                                 for check in ("checker", "interface", "onnxruntime")}
            return None
        if len(run.steps) == 1:
            return run.steps[0][1].index, problems, model, run.start
        good, bad = 0, len(run.steps)  # prefixes: the first ``good`` steps pass, the first ``bad`` fail
        good_bytes, bad_model = run.start, model
        while bad - good > 1:
            middle = (good + bad) // 2
            trial = _replay(good_bytes, [s for s, _ in run.steps[good:middle]], context)
            _, trial_problems = check(trial, run.steps[middle - 1][1])
            if trial_problems:
                bad, bad_model, problems = middle, trial, trial_problems
            else:
                good, good_bytes = middle, trial.SerializeToString()
        culprit = run.steps[bad - 1][1]
        culprit.checks["onnxruntime"] = f"bisected: steps {run.steps[0][1].index}-{run.steps[-1][1].index} failed together"
        return culprit.index, problems, bad_model, good_bytes

    def _check_exact(self, model, full: bool, previous, record: StepRecord):
        """The exact gate against ``previous`` and the lossy gates against the original, on every
        sample (``full``) or the subset: ((outputs, accuracy), problems)."""
        outputs, vs_previous, vs_original, accuracy = self._compare(model, full, previous, exact=True)
        problems = [f"not exact: {f}" for f in vs_previous.failures]
        problems += self._vs_original(vs_original, record, len(self.feeds if full else self.subset)).failures
        record.vs_previous = vs_previous.to_dict()
        return (outputs, accuracy), problems

    def _compare(self, model, full: bool, previous, *, exact: bool):
        """Run ``model`` on every sample (``full``) or the subset; compare it with ``previous`` (the exact
        gate when ``exact``) and the original (lossy gates): (outputs, vs previous, vs original, accuracy)."""
        tol = self.tolerances
        previous_tol, atols = (tol, self.atols) if exact else (Tolerances(), None)
        original_tol = Tolerances(min_cosine=tol.min_cosine, max_abs=tol.max_abs)
        if self.sharded is not None:
            outputs, (vs_previous, vs_original), accuracy = self.sharded.evaluate(
                model, full=full, against=[(previous, previous_tol, atols), (self.reference, original_tol, None)])
            return outputs, vs_previous, vs_original, accuracy
        feeds = self.feeds if full else self.subset
        outputs = run_model(model, feeds, threads=VALIDATION_THREADS, join=True, prepack=self.prepack)
        vs_previous = compare_outputs(previous, outputs, previous_tol, exact=exact, atols=atols)
        vs_original = compare_outputs(_head(self.reference, len(feeds)), outputs, original_tol, exact=False)
        accuracy = task_accuracy(outputs, self.labels) if self.labels is not None and full else None
        return outputs, vs_previous, vs_original, accuracy

    def check_lossy(self, model: onnx.ModelProto, record: StepRecord, *, gate: bool) -> list[str]:
        """A lossy step on every sample: metrics against the last validated outputs and the original;
        the lossy gates' complaints when ``gate`` (the last of consecutive lossy steps: ``prune,distill``
        is judged on the repaired model), else none (``checks['lossy_gate']`` says so)."""
        outputs, vs_previous, vs_original, accuracy = self._compare(model, True, self.previous, exact=False)
        record.vs_previous = vs_previous.to_dict()
        problems = self._vs_original(vs_original, record, len(self.feeds)).failures + self._accuracy(accuracy, record)
        self.previous, self.previous_subset = outputs, _head(outputs, len(self.subset))
        if not gate:
            record.checks["lossy_gate"] = "judged with the next lossy step"
            return []
        return problems

    def _vs_original(self, comparison: Comparison, record: StepRecord, samples: int) -> Comparison:
        record.vs_original = comparison.to_dict()
        record.vs_original["samples"] = samples
        return comparison

    def _accuracy(self, accuracy: float | None, record: StepRecord) -> list[str]:
        """Top-1 accuracy on every sample, with labels; the accuracy gate's complaint, if any."""
        if self.labels is None:
            return []
        tol = self.tolerances
        record.accuracy = accuracy
        drop = 100 * (self.reference_accuracy - record.accuracy)
        if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop:
            return [f"accuracy {record.accuracy:.2%} is {drop:.2f} points below the original's "
                    f"{self.reference_accuracy:.2%} (max-accuracy-drop {tol.max_accuracy_drop:g})"]
        return []


def _head(outputs: dict[str, list] | Validated, n: int) -> dict[str, list] | Validated:
    """The first ``n`` samples' outputs (a Validated model's sums are kept per shard: the subset is its first)."""
    if isinstance(outputs, Validated):
        return outputs
    return {name: values[:n] for name, values in outputs.items()}


def _interface_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Just the graph's inputs, outputs and initializer names: what the interface check compares."""
    copy = onnx.ModelProto()
    copy.graph.input.extend(model.graph.input)
    copy.graph.output.extend(model.graph.output)
    initializers = {t.name for t in model.graph.initializer}
    copy.graph.initializer.extend(onnx.TensorProto(name=v.name) for v in model.graph.input if v.name in initializers)
    return copy


def _check_input(model: onnx.ModelProto, input_path: str | Path | None) -> None:
    """Every step must pass the full checker: an input that already fails it is the input's fault, said up front.

    A model read from a file is checked from that file (the checker parses it in C++: half the time
    of serializing the model in Python first).
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as scratch:
        path = Path(input_path) if input_path is not None else (
            Path(scratch) / "input.onnx" if needs_file(model) else None)
        if input_path is None and path is not None:
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
    if has_external_data(model) or serialized_size_above(model, REPRO_COPY_LIMIT):
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

