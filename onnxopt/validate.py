"""The one place that opens onnxruntime sessions: runs, comparison metrics, verdicts.

Comparisons follow Polygraphy's shape: per-output error statistics with explicit tolerances.
Exact passes are gated by ``|cand - ref| <= atol + rtol * (|ref| + rms(ref))``, where each output's
atol is at least ``noise_factor`` times the model's own float noise (:func:`measure_noise`); lossy
passes by ``min_cosine`` (default 0.99 in the API and CLI), ``max_abs`` and ``max_accuracy_drop``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import FeedSet, input_dims, model_inputs
from .errors import InputError
from .graph import model_tensors
from .modelio import needs_file, save_scratch
from .tensors import tensor_nbytes


DEFAULT_MIN_COSINE = 0.99  # lossy gate of `optimize` unless relaxed (README: Validation, for the measurements)
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of top-1 accuracy, with labels
NOISE_FACTOR = 4.0  # exact gate: an output's atol is at least this many times its measured float noise
NOISE_CAP = 1e-3  # noise counts up to this fraction of the output's largest |value|: beyond, it is not rounding
VALIDATION_THREADS = 0  # onnxruntime's default: one intra-op thread per physical core
BATCH_BYTES = 32 << 20  # automatic batching: fetched values per joined batch (bounds memory)
MAX_BATCH = 16  # automatic batching: samples per joined batch (fixed: memory does not depend on the sample count)
PREPACK_LIMIT = 256 * 2**20  # weight bytes above which validation sessions skip prepacking (see validation_prepack)


@dataclass(frozen=True)
class Tolerances:
    exact_rtol: float = 1e-5
    exact_atol: float = 1e-6
    min_cosine: float | None = None
    max_abs: float | None = None
    max_accuracy_drop: float | None = None  # in points (percent), needs labels
    noise_factor: float = NOISE_FACTOR

    def lossy_gates(self, labels: bool) -> list[str]:
        """The lossy gates in force, as the verdict line names them."""
        gates = [] if self.min_cosine is None else [f"cosine >= {self.min_cosine:g}"]
        if self.max_abs is not None:
            gates.append(f"max abs <= {self.max_abs:g}")
        if labels and self.max_accuracy_drop is not None:
            drop = self.max_accuracy_drop
            gates.append(f"accuracy drop <= {drop:g} point{'' if drop == 1 else 's'}")
        return gates

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
    """An onnxruntime CPU session over a model in memory (or a temporary file for big / external models),
    or over a model file given by path (no intermediate outputs then)."""

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike,
        extra_outputs: Sequence[str] = (),
        *,
        optimize: bool = False,
        threads: int = 1,
        prepack: bool = True,
        initializers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """``threads``: intra-op threads (1 by default, so results and timings do not depend on the
        machine; 0 for onnxruntime's default, one per physical core). ``prepack=False`` leaves MatMul /
        Conv weights as they are instead of packing a copy of each at load: validation runs a few
        batches, and a multi-GB model's external data is then used where onnxruntime maps it (the
        session opens in milliseconds instead of seconds per GB). ``initializers``: the data of the model's
        tensors stored as external data without a file, handed over in memory (not serialized)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.intra_op_num_threads = threads  # 1 by default: results and timings do not depend on the machine
        options.inter_op_num_threads = 1
        if threads != 1:  # threads that wait instead of spinning: a loaded machine is not slowed further
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self._initializers = [ort.OrtValue.ortvalue_from_numpy(a) for a in (initializers or {}).values()]
        if initializers:  # kept alive with the session, which reads them where they are
            options.add_external_initializers(list(initializers), self._initializers)
        options.log_severity_level = 4  # failures reach the user as our own one-line error
        from_file = isinstance(model, (str, os.PathLike))  # a benchmark opens the file as a deployment would
        added = 0 if from_file else _add_outputs(model, extra_outputs)
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            if from_file:
                self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            elif not initializers and needs_file(model):
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


def validation_prepack(model: onnx.ModelProto) -> bool:
    """Whether a validation run packs the model's weights at load (onnxruntime's default).

    Up to ``PREPACK_LIMIT`` bytes of weights, yes: packed weights run single samples and joined
    batches through the same kernel, so the runs agree to the bit, and packing is quick. Above it,
    packing costs seconds per GB and as much memory again for a handful of batches; unpacked, the
    weights of a model with external data are used where onnxruntime maps them. The choice is made
    once per validation, from the original, so that every model compared runs alike.
    """
    return sum(tensor_nbytes(t) for t in model_tensors(model)) <= PREPACK_LIMIT


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


def batched(feeds: Iterable[Mapping[str, np.ndarray]], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, feed): ``size`` consecutive sample feeds joined along the batch axis (FeedSet: no copies)."""
    if size <= 1:
        yield from ((1, {k: np.asarray(v) for k, v in f.items()}) for f in feeds)  # 0-d samples come as numpy scalars
        return
    if isinstance(feeds, FeedSet):
        yield from ((min(size, len(feeds) - start), feed)
                    for start, feed in zip(range(0, len(feeds), size), feeds.batches(size)))
        return
    group: list[Mapping[str, np.ndarray]] = []
    for feed in feeds:
        group.append(feed)
        if len(group) == size:
            yield size, {k: np.concatenate([np.asarray(g[k]) for g in group]) for k in group[0]}
            group = []
    if group:
        yield len(group), {k: np.concatenate([np.asarray(g[k]) for g in group]) for k in group[0]}


def dynamic_batch(model: onnx.ModelProto) -> bool:
    """Every input's first axis is symbolic (or unknown): samples can be joined along it."""
    dims = [input_dims(v) for v in model_inputs(model)]
    return all(d is None or (d and not (isinstance(d[0], int) and d[0] > 0)) for d in dims)


def _same_rows(single: Mapping[str, np.ndarray], joined: Mapping[str, np.ndarray], size: int) -> bool:
    """The joined run's first rows are the single run's values (batch-major, no mixing of samples)."""
    for name, a in single.items():
        b = joined[name]
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.ndim == 0 or b.shape != (a.shape[0] * size, *a.shape[1:]):
            return False
        if np.array_equal(b[: a.shape[0]], a):  # the usual case, one cheap pass
            continue
        scale = float(np.abs(a).max(initial=0.0))
        if not np.allclose(b[: a.shape[0]], a, rtol=1e-3, atol=1e-5 * max(scale, 1.0)):
            return False
    return True


def joined_runs(session: Session, model, feeds, fetched: list[str], batch_size: int):
    """(samples, feed, fetched values) per run: ``batch_size`` samples a run, or automatic (0).

    Automatic: a FeedSet of a model with a dynamic batch axis runs sample 0 alone, then a joined
    batch (size from the bytes fetched per sample); if the joined batch reproduces sample 0 the
    rest runs joined too, otherwise one sample a run. The probe costs one extra sample run.
    """
    if batch_size or not isinstance(feeds, FeedSet) or len(feeds) < 2 or not dynamic_batch(model):
        for samples, feed in batched(feeds, batch_size or 1):
            yield samples, feed, session.run(feed, fetched) if fetched else {}
        return
    first = next(iter(feeds))
    single = session.run(first, fetched) if fetched else {}
    per_sample = sum(v.nbytes for v in (*single.values(), *first.values()))
    size = min(MAX_BATCH, len(feeds), max(1, BATCH_BYTES // max(per_sample, 1)))
    if size > 1:
        head = next(feeds.batches(size))
        joined = session.run(head, fetched) if fetched else {}
        if _same_rows(single, joined, size):
            del single  # values live only until folded: no run starts while an earlier one's are held
            yield size, head, joined
            del joined
            rest = feeds.window(size, len(feeds))
            yield from joined_runs(session, model, rest, fetched, size) if len(rest) else ()
            return
        del joined
    yield 1, first, single
    del single
    yield from joined_runs(session, model, feeds.window(1, len(feeds)), fetched, 1)


def run_model(model: onnx.ModelProto, feeds: Iterable[dict], *, join: bool = False, path: str | os.PathLike | None = None,
              **session_options) -> dict[str, list[np.ndarray]]:
    """Outputs for every sample, in order: ``{output name: [array per sample]}``.

    ``join``: samples of a FeedSet run joined along a dynamic batch axis where that gives each
    sample its own rows (:func:`joined_runs` probes it), and are split back per sample.
    ``path``: the model's own file, which onnxruntime then reads instead of a serialized copy.
    """
    with Session(path or model, **session_options) as session:
        return session_outputs(session, model, feeds, join=join)


def session_outputs(session: Session, model: onnx.ModelProto, feeds: Iterable[dict], *,
                    join: bool = False) -> dict[str, list[np.ndarray]]:
    """:func:`run_model` on an open session (an executor's worker keeps its sessions between shards)."""
    if not join:
        return session.run_all(feeds)
    results: dict[str, list[np.ndarray]] = {}
    for samples, _, values in joined_runs(session, model, feeds, session.output_names, 0):
        for name, value in values.items():
            results.setdefault(name, []).extend(np.split(value, samples) if samples > 1 else [value])
    return results


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


def measure_noise(model: onnx.ModelProto, feeds: FeedSet, reference: dict[str, list], *,
                  threads: int = VALIDATION_THREADS, path: str | os.PathLike | None = None,
                  prepack: bool = True) -> dict[str, float]:
    """The model's own float noise per output: the max abs difference between its outputs under
    onnxruntime's full graph optimizations and ``reference`` (the same feeds, optimizations off,
    the same threads). onnxruntime's optimizer makes the rewrites an exact pass makes (Conv+BatchNorm
    and bias fusions, constant folding, fused kernels), so this is how far an exactly equivalent
    float32 graph moves the outputs on this model. 0 where the optimized session cannot load; at
    most ``NOISE_CAP`` of the output's largest finite |value| (an optimizer that changes results more
    than that is not rounding, and must not widen the gate). ``reference`` comes from
    ``run_model(..., join=True)`` with the same ``prepack``, as the runs this noise is compared with."""
    try:
        optimized = run_model(model, feeds, optimize=True, threads=threads, join=True, path=path, prepack=prepack)
    except InputError:
        return {name: 0.0 for name in reference}
    noise = {}
    for name, ref in reference.items():
        try:
            diffs = [np.abs(numeric_values(c) - numeric_values(r)) for r, c in zip(ref, optimized.get(name, []))]
        except (TypeError, ValueError):  # strings, or shapes that differ: no noise estimate
            diffs = []
        finite = [d[np.isfinite(d)] for d in diffs]
        scale = max((float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in map(numeric_values, ref)
                     if v.size), default=0.0) if diffs else 0.0
        noise[name] = min(float(max((d.max(initial=0.0) for d in finite), default=0.0)), NOISE_CAP * scale)
    return noise


def exact_atols(noise: Mapping[str, float], tol: Tolerances) -> dict[str, float]:
    """Each output's exact-gate atol: ``noise_factor`` times its measured noise, at least ``exact_atol``."""
    return {name: max(tol.exact_atol, tol.noise_factor * n) for name, n in noise.items()}


def exact_mismatches(ref: np.ndarray, cand: np.ndarray, tol: Tolerances, eps: float = 0.0,
                     atol: float | None = None, scale: float | None = None) -> int:
    """Elements outside ``atol + rtol * (|ref| + rms(ref))``, rtol at least ``2 * eps``; ``atol``
    defaults to ``tol.exact_atol`` (the manager passes the output's noise-calibrated one).

    The RMS term is the output's own scale: a pass that only reorders float sums (zero-rows
    dropping zero channels) moves a near-zero element by rounding of its large summands, not of
    its small result, so a purely elementwise rtol would call exact arithmetic inexact. ``eps`` is
    the output dtype's machine epsilon: a float16 output computed in another order (a value folded
    ahead of time) may differ by an ulp, 1e-3 relative, which is as exact as float16 gets.
    ``scale``: the RMS of the whole output when ``ref`` is one shard of it.
    """
    if scale is None:
        scale = float(np.sqrt(np.mean(np.square(ref[np.isfinite(ref)])))) if ref.size else 0.0
    limit = (tol.exact_atol if atol is None else atol) + max(tol.exact_rtol, 2 * eps) * (np.abs(ref) + scale)
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


def output_metrics(reference: list, candidate: list, tol: Tolerances, atol: float | None = None) -> OutputMetrics:
    """Per-output metrics of ``candidate`` against ``reference`` (lists of per-sample values)."""
    return output_sums(reference, candidate, tol, tol.exact_atol if atol is None else atol).metrics()


@dataclass
class OutputSums:
    """Comparison sums of one output over some samples, mergeable over shards of them (onnxopt.sharded):
    dot product and squared norms (cosine, relative L2, SNR), maxima, and counts."""

    values: int = 0
    dot: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    diff_sq: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    nonfinite: bool = False
    mismatches: int = 0
    top1: tuple[int, int] | None = None  # (agreements, positions); positions -1: shapes differ
    unequal_strings: int | None = None  # string outputs: samples that differ
    shapes_differ: bool = False

    def merge(self, other: OutputSums) -> OutputSums:
        top1 = self.top1 if other.top1 is None else other.top1 if self.top1 is None else (
            (0, -1) if -1 in (self.top1[1], other.top1[1]) else
            (self.top1[0] + other.top1[0], self.top1[1] + other.top1[1]))
        strings = None if self.unequal_strings is None else self.unequal_strings + (other.unequal_strings or 0)
        return OutputSums(
            self.values + other.values, self.dot + other.dot, self.ref_sq + other.ref_sq,
            self.cand_sq + other.cand_sq, self.diff_sq + other.diff_sq,
            float(np.maximum(self.max_abs, other.max_abs)), float(np.maximum(self.max_rel, other.max_rel)),
            self.nonfinite or other.nonfinite, self.mismatches + other.mismatches, top1, strings,
            self.shapes_differ or other.shapes_differ,
        )

    def metrics(self) -> OutputMetrics:
        """The metrics :func:`onnxopt.validate.output_metrics` gives on all samples at once."""
        if self.unequal_strings is not None:
            same = self.unequal_strings == 0
            return OutputMetrics(0.0 if same else math.inf, 0.0 if same else math.inf, 0.0 if same else math.inf,
                                 1.0 if same else 0.0, math.inf if same else -math.inf, None, self.unequal_strings,
                                 same)
        if self.shapes_differ:
            return OutputMetrics(math.inf, math.inf, math.inf, 0.0, -math.inf, None, self.mismatches, False)
        ref_norm, cand_norm, diff_norm = math.sqrt(self.ref_sq), math.sqrt(self.cand_sq), math.sqrt(self.diff_sq)
        if ref_norm == 0 and cand_norm == 0:
            cosine = 1.0
        elif ref_norm == 0 or cand_norm == 0:
            cosine = 0.0
        else:
            cosine = self.dot / (ref_norm * cand_norm)
        agree, total = self.top1 or (0, 0)
        return OutputMetrics(
            max_abs=math.inf if self.nonfinite else self.max_abs,
            max_rel=self.max_rel,
            rel_l2=diff_norm / ref_norm if ref_norm else (0.0 if diff_norm == 0 else math.inf),
            cosine=cosine,
            snr_db=math.inf if diff_norm == 0 else (20 * math.log10(ref_norm / diff_norm) if ref_norm else -math.inf),
            top1_agreement=None if self.top1 is None else (0.0 if total < 0 else (agree / total if total else None)),
            mismatches=self.mismatches,
            within_exact_tolerance=self.mismatches == 0,
        )


def output_sums(reference: list, candidate: list, tol: Tolerances, atol: float, scale: float | None = None) -> OutputSums:
    """Sums for one output over these samples (``scale``: the reference output's RMS over all the samples
    compared, when these are a shard of them; None: these are all)."""
    try:
        ref = np.concatenate([numeric_values(r).ravel() for r in reference])
        cand = np.concatenate([numeric_values(c).ravel() for c in candidate])
    except TypeError:  # strings: equal or not
        return OutputSums(unequal_strings=sum(not np.array_equal(np.asarray(r), np.asarray(c))
                                              for r, c in zip(reference, candidate)))
    if ref.shape != cand.shape:
        return OutputSums(mismatches=int(max(ref.size, cand.size)), shapes_differ=True)
    delta = cand - ref
    diff = np.abs(delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    return OutputSums(
        values=ref.size, dot=float(np.dot(ref, cand)), ref_sq=float(np.dot(ref, ref)),
        cand_sq=float(np.dot(cand, cand)), diff_sq=float(np.dot(delta, delta)),
        max_abs=float(diff.max(initial=0.0)), max_rel=float(rel.max(initial=0.0)),
        nonfinite=not bool((np.isfinite(ref) & np.isfinite(cand)).all()),
        mismatches=exact_mismatches(ref, cand, tol, _epsilon(reference), atol, scale),
        top1=top1_counts(reference, candidate),
    )


def top1_counts(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[int, int] | None:
    """(argmax agreements, argmax positions) for outputs that look like class scores, else None;
    total -1 when a sample's shapes differ (no agreement then)."""
    first = reference[0]
    if not isinstance(first, np.ndarray) or first.dtype.kind != "f" or first.ndim < 1 or first.shape[-1] < 2:
        return None
    agree = total = 0
    for r, c in zip(reference, candidate):
        r, c = np.asarray(r), np.asarray(c)
        if r.shape != c.shape:
            return 0, -1
        a, b = r.argmax(axis=-1), c.argmax(axis=-1)
        agree += int(np.count_nonzero(a == b))
        total += a.size
    return agree, total


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
    atols: Mapping[str, float] | None = None,
) -> Comparison:
    """Metrics per output and a verdict: exact steps need every element within tolerance
    (``atols``: per-output atol from :func:`exact_atols`, else ``tol.exact_atol``)."""
    result = Comparison()
    for name, ref in reference.items():
        if name not in candidate:
            result.failures.append(f"output '{name}' is missing")
            continue
        atol = (atols or {}).get(name, tol.exact_atol)
        judge(result, name, output_metrics(ref, candidate[name], tol, atol), tol, exact=exact, atol=atol)
    return result


def judge(result: Comparison, name: str, m: OutputMetrics, tol: Tolerances, *, exact: bool, atol: float) -> None:
    """Record one output's metrics in ``result`` with the gates' complaints (shared by sharded validation)."""
    result.outputs[name] = m
    if exact and not m.within_exact_tolerance:
        result.failures.append(
            f"output '{name}': {m.mismatches} values outside rtol={tol.exact_rtol:g} atol={atol:.3g} "
            f"(max abs {m.max_abs:.3g})"
        )
    if tol.min_cosine is not None and m.cosine < tol.min_cosine:
        result.failures.append(f"output '{name}': cosine {m.cosine:.6f} < min-cosine {tol.min_cosine}")
    if tol.max_abs is not None and m.max_abs > tol.max_abs:
        result.failures.append(f"output '{name}': max abs {m.max_abs:.3g} > max-abs {tol.max_abs}")


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
