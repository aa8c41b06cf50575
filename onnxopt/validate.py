"""The one place that opens onnxruntime sessions: runs, comparison metrics, verdicts.

Comparisons follow Polygraphy's shape: per-output error statistics with explicit tolerances.
Exact passes are gated by ``|cand - ref| <= atol + rtol * |ref|``; lossy passes by the user's
``min_cosine`` / ``max_abs`` thresholds only.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .modelio import needs_file, save_scratch


@dataclass(frozen=True)
class Tolerances:
    exact_rtol: float = 1e-5
    exact_atol: float = 1e-6
    min_cosine: float | None = None
    max_abs: float | None = None
    max_accuracy_drop: float | None = None  # in points (percent), needs labels

    def __post_init__(self) -> None:
        """Refuse gates that cannot mean anything (a cosine above 1 would fail every step)."""
        limits = {"min-cosine": (self.min_cosine, -1.0, 1.0), "max-abs": (self.max_abs, 0.0, math.inf),
                  "max-accuracy-drop": (self.max_accuracy_drop, 0.0, 100.0),
                  "exact-rtol": (self.exact_rtol, 0.0, math.inf), "exact-atol": (self.exact_atol, 0.0, math.inf)}
        for name, (given, low, high) in limits.items():
            if given is not None and not low <= given <= high:
                span = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
                raise InputError(f"--{name} must be {span}, not {given:g}")


class Session:
    """An onnxruntime CPU session over a model in memory (or a temporary file for big / external models)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        extra_outputs: Sequence[str] = (),
        *,
        optimize: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.intra_op_num_threads = 1  # fixed: results and timings do not depend on the machine
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # failures reach the user as our own one-line error
        added = _add_outputs(model, extra_outputs)
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            if needs_file(model):
                self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-session-")
                path = Path(self._tmp.name) / "model.onnx"
                save_scratch(model, path)
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(
                    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
        finally:
            if added:
                del model.graph.output[-added:]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        try:
            values = self.session.run(names, feed)
        except Exception as exc:
            raise InputError(f"onnxruntime failed to run the model: {_first_line(exc)}") from None
        return dict(zip(names, values))

    def run_all(self, feeds: Iterable[dict]) -> dict[str, list[np.ndarray]]:
        """Outputs for every sample, in order: ``{output name: [array per sample]}``."""
        results: dict[str, list[np.ndarray]] = {}
        for feed in feeds:
            for name, value in self.run(feed).items():
                results.setdefault(name, []).append(value)
        return results

    def close(self) -> None:
        del self.session
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> int:
    """Expose intermediate values as graph outputs (temporarily: the caller removes them)."""
    present = {o.name for o in model.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    for name in wanted:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    return len(wanted)


def run_model(model: onnx.ModelProto, feeds: Iterable[dict], **session_options) -> dict[str, list[np.ndarray]]:
    """Outputs for every sample, in order: ``{output name: [array per sample]}``."""
    with Session(model, **session_options) as session:
        return session.run_all(feeds)


@dataclass
class OutputMetrics:
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    snr_db: float
    top1_agreement: float | None = None
    mismatches: int = 0
    within_exact_tolerance: bool = True


@dataclass
class Comparison:
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "outputs": {name: {k: _json_number(v) for k, v in asdict(m).items()} for name, m in self.outputs.items()},
        }

    @property
    def worst_cosine(self) -> float:
        return min((m.cosine for m in self.outputs.values()), default=1.0)


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


def exact_mismatches(ref: np.ndarray, cand: np.ndarray, tol: Tolerances, eps: float = 0.0) -> int:
    """Elements outside ``atol + rtol * (|ref| + rms(ref))``, rtol at least ``2 * eps``.

    The RMS term is the output's own scale: a pass that only reorders float sums (zero-rows
    dropping zero channels) moves a near-zero element by rounding of its large summands, not of
    its small result, so a purely elementwise rtol would call exact arithmetic inexact. ``eps`` is
    the output dtype's machine epsilon: a float16 output computed in another order (a value folded
    ahead of time) may differ by an ulp, 1e-3 relative, which is as exact as float16 gets.
    """
    scale = float(np.sqrt(np.mean(np.square(ref[np.isfinite(ref)])))) if ref.size else 0.0
    limit = tol.exact_atol + max(tol.exact_rtol, 2 * eps) * (np.abs(ref) + scale)
    same = (np.abs(cand - ref) <= limit) | (np.isnan(ref) & np.isnan(cand)) | (ref == cand)
    return int(np.count_nonzero(~same))


def _epsilon(values: list) -> float:
    """Machine epsilon of the outputs' float dtype (0 for anything else: ints, maps, sequences)."""
    dtypes = {np.asarray(v).dtype for v in values if isinstance(v, np.ndarray)}
    return max((float(np.finfo(d).eps) for d in dtypes if d.kind == "f"), default=0.0)


def numeric_values(value) -> np.ndarray:
    """An output as float64 values: tensors as they are; sequences and maps (say ZipMap's
    per-class probabilities) by their elements, maps in key order; strings are not numeric."""
    if isinstance(value, dict):
        return np.concatenate([numeric_values(value[k]).ravel() for k in sorted(value)] or [np.zeros(0)])
    if isinstance(value, (list, tuple)):
        return np.concatenate([numeric_values(v).ravel() for v in value] or [np.zeros(0)])
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"non-numeric output of dtype {array.dtype}")
    return array.astype(np.float64)


def output_metrics(reference: list, candidate: list, tol: Tolerances) -> OutputMetrics:
    try:
        ref = np.concatenate([numeric_values(r).ravel() for r in reference])
        cand = np.concatenate([numeric_values(c).ravel() for c in candidate])
    except TypeError:  # strings: equal or not
        unequal = sum(not np.array_equal(np.asarray(r), np.asarray(c)) for r, c in zip(reference, candidate))
        same = unequal == 0
        return OutputMetrics(0.0 if same else math.inf, 0.0 if same else math.inf, 0.0 if same else math.inf,
                             1.0 if same else 0.0, math.inf if same else -math.inf, None, unequal, same)
    if ref.shape != cand.shape:
        return OutputMetrics(math.inf, math.inf, math.inf, 0.0, -math.inf, None, int(max(ref.size, cand.size)), False)
    diff = np.abs(cand - ref)
    finite = np.isfinite(ref) & np.isfinite(cand)
    mismatches = exact_mismatches(ref, cand, tol, _epsilon(reference))
    max_abs = float(diff.max(initial=0.0)) if finite.all() else math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    ref_norm, diff_norm, cand_norm = (float(np.linalg.norm(x)) for x in (ref, cand - ref, cand))
    if ref_norm == 0 and cand_norm == 0:
        cosine = 1.0
    elif ref_norm == 0 or cand_norm == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(ref, cand) / (ref_norm * cand_norm))
    return OutputMetrics(
        max_abs=max_abs,
        max_rel=float(rel.max(initial=0.0)),
        rel_l2=diff_norm / ref_norm if ref_norm else (0.0 if diff_norm == 0 else math.inf),
        cosine=cosine,
        snr_db=math.inf if diff_norm == 0 else (20 * math.log10(ref_norm / diff_norm) if ref_norm else -math.inf),
        top1_agreement=_top1(reference, candidate),
        mismatches=mismatches,
        within_exact_tolerance=mismatches == 0,
    )


def _top1(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float | None:
    """Argmax agreement over the last axis, for outputs that look like class scores."""
    first = reference[0]
    if not isinstance(first, np.ndarray) or first.dtype.kind != "f" or first.ndim < 1 or first.shape[-1] < 2:
        return None
    agree = total = 0
    for r, c in zip(reference, candidate):
        r, c = np.asarray(r), np.asarray(c)
        if r.shape != c.shape:
            return 0.0
        a, b = r.argmax(axis=-1), c.argmax(axis=-1)
        agree += int(np.count_nonzero(a == b))
        total += a.size
    return agree / total if total else None


def task_accuracy(outputs: dict[str, list[np.ndarray]], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output (argmax over its last axis) against per-sample labels."""
    scores = next(iter(outputs.values()))
    predicted = np.concatenate([np.asarray(s).argmax(axis=-1).ravel() for s in scores])
    expected = labels.reshape(-1)
    if predicted.shape != expected.shape:
        raise InputError(f"labels: {expected.size} labels for {predicted.size} predictions")
    return float(np.mean(predicted == expected))


def compare_outputs(
    reference: dict[str, list[np.ndarray]],
    candidate: dict[str, list[np.ndarray]],
    tol: Tolerances,
    *,
    exact: bool,
) -> Comparison:
    """Metrics per output and a verdict: exact steps need every element within tolerance."""
    result = Comparison()
    for name, ref in reference.items():
        if name not in candidate:
            result.failures.append(f"output '{name}' is missing")
            continue
        m = output_metrics(ref, candidate[name], tol)
        result.outputs[name] = m
        if exact and not m.within_exact_tolerance:
            result.failures.append(
                f"output '{name}': {m.mismatches} values outside rtol={tol.exact_rtol:g} atol={tol.exact_atol:g} "
                f"(max abs {m.max_abs:.3g})"
            )
        if tol.min_cosine is not None and m.cosine < tol.min_cosine:
            result.failures.append(f"output '{name}': cosine {m.cosine:.6f} < min-cosine {tol.min_cosine}")
        if tol.max_abs is not None and m.max_abs > tol.max_abs:
            result.failures.append(f"output '{name}': max abs {m.max_abs:.3g} > max-abs {tol.max_abs}")
    return result


def check_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """Graph inputs/outputs keep their names, dtypes and ranks."""
    problems = []
    for kind in ("input", "output"):
        old = _signature(getattr(before.graph, kind), before, kind)
        new = _signature(getattr(after.graph, kind), after, kind)
        if [n for n, _, _ in old] != [n for n, _, _ in new]:
            problems.append(f"graph {kind}s changed: {[n for n, _, _ in old]} -> {[n for n, _, _ in new]}")
            continue
        for (name, dtype, rank), (_, dtype2, rank2) in zip(old, new):
            if dtype != dtype2:
                problems.append(f"graph {kind} '{name}' changed dtype {dtype} -> {dtype2}")
            if rank is not None and rank2 is not None and rank != rank2:
                problems.append(f"graph {kind} '{name}' changed rank {rank} -> {rank2}")
    return problems


def _signature(values, model: onnx.ModelProto, kind: str) -> list[tuple[str, int, int | None]]:
    """Name, dtype and rank of each input a caller must feed, or of every output (an initializer may be one)."""
    initializers = {t.name for t in model.graph.initializer} if kind == "input" else set()
    sig = []
    for v in values:
        if v.name in initializers:
            continue
        t = v.type.tensor_type
        sig.append((v.name, t.elem_type, len(t.shape.dim) if t.HasField("shape") else None))
    return sig


def check_structure(model: onnx.ModelProto, path: Path | None = None) -> str | None:
    """The ONNX checker with full shape inference; None when it passes, else the first line of its complaint."""
    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker and shape inference raise several types
        return _first_line(exc)
    return None
