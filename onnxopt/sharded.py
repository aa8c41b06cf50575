"""Validation over shards through an executor: workers reduce outputs to mergeable metric sums.

Each shard's worker runs the candidate and the models it is compared with (the original, the
last validated model) on the shard's samples and returns, per output, sums that merge: dot
product and squared norms (cosine, relative L2, SNR), max abs / max relative error, element
counts outside the exact tolerance, argmax agreements, task-accuracy hits, and the candidate's
own sum of squares (the scale of the exact gate once it is the last validated model). No output
array leaves a worker. Partials are merged in shard order, shards have a fixed size: counts and
maxima equal the in-process run's, float sums are the same for any number of workers.

The exact gate's scale (each output's RMS over the samples compared) is global: it comes from
the sums of the run that validated the reference, so one pass per check suffices.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
import onnx

from .data import FeedSet
from .errors import InputError
from .executor import Executor, ModelHandle, Shard, WorkerCache, split
from .validate import (
    Comparison, OutputSums, Session, Tolerances, judge, measure_noise, numeric_values, output_sums, session_outputs,
)

WORKER_THREADS = 1  # onnxruntime threads per worker: workers, not threads, use the cores (results do not
#   depend on the machine)


def _own_sums(outputs: dict[str, list]) -> dict[str, tuple[float, int]]:
    """Per output, the sum of squares of its finite values and their count (an RMS once merged)."""
    sums = {}
    for name, values in outputs.items():
        try:
            flat = np.concatenate([numeric_values(v).ravel() for v in values])
        except TypeError:
            continue
        finite = flat[np.isfinite(flat)]
        sums[name] = (float(np.dot(finite, finite)), int(finite.size))
    return sums


@dataclass(frozen=True)
class _Against:
    """One comparison a shard task makes: the candidate against ``model``'s outputs."""

    model: ModelHandle
    tolerances: Tolerances
    atols: dict[str, float] | None
    scales: dict[str, float]  # the reference outputs' RMS over every sample compared


@dataclass(frozen=True)
class _Job:
    candidate: ModelHandle
    against: tuple[_Against, ...]
    labels: np.ndarray | None
    noise: bool = False  # also measure the candidate's float noise (on the exact-subset shard)


@dataclass
class _ShardResult:
    own: dict[str, tuple[float, int]]
    names: list[str]
    comparisons: list[dict[str, OutputSums]]
    missing: list[list[str]]
    hits: tuple[int, int, int] | None = None  # (hits, predictions, labels)
    noise: dict[str, float] | None = None


def _opened(cache: WorkerCache, handle: ModelHandle) -> tuple[onnx.ModelProto, Session]:
    model = cache.get(("model", handle.key), lambda: cache.model(handle))
    return model, cache.get(("session", handle.key), lambda: Session(model, threads=WORKER_THREADS))


def _outputs(cache: WorkerCache, handle: ModelHandle, feeds: FeedSet) -> dict[str, list]:
    model, session = _opened(cache, handle)
    return session_outputs(session, model, feeds, join=True)


def _evaluate(cache: WorkerCache, shard: Shard, job: _Job) -> _ShardResult:
    """The worker's part: run the candidate and the models it is compared with on one shard, reduce."""
    outputs = _outputs(cache, job.candidate, shard.feeds)
    result = _ShardResult(_own_sums(outputs), list(outputs), [], [])
    computed = {job.candidate.key: outputs}  # the last validated model is often the original: run it once
    for against in job.against:
        if against.model.key not in computed:
            computed[against.model.key] = _outputs(cache, against.model, shard.feeds)
        reference = computed[against.model.key]
        result.missing.append([n for n in reference if n not in outputs])
        result.comparisons.append({
            name: output_sums(ref, outputs[name], against.tolerances,
                              (against.atols or {}).get(name, against.tolerances.exact_atol), against.scales.get(name, 0.0))
            for name, ref in reference.items() if name in outputs})
    if job.labels is not None:
        predicted = np.concatenate([np.asarray(s).argmax(axis=-1).ravel() for s in next(iter(outputs.values()))])
        expected = job.labels[shard.start: shard.stop].reshape(-1)
        hits = int(np.count_nonzero(predicted == expected)) if predicted.shape == expected.shape else 0
        result.hits = (hits, predicted.size, expected.size)
    if job.noise:
        model, _ = _opened(cache, job.candidate)
        result.noise = measure_noise(model, shard.feeds, outputs, threads=WORKER_THREADS)
    return result


@dataclass
class Validated:
    """A validated model as sharded validation keeps it: its handle and its per-shard own sums."""

    handle: ModelHandle
    own: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)  # shard index -> sums

    def scales(self, shards: list[Shard]) -> dict[str, float]:
        """Each output's RMS over ``shards`` (sums merged in shard order)."""
        merged: dict[str, tuple[float, int]] = {}
        for shard in shards:
            for name, (sq, n) in self.own[shard.index].items():
                total, count = merged.get(name, (0.0, 0))
                merged[name] = (total + sq, count + n)
        return {name: math.sqrt(sq / n) if n else 0.0 for name, (sq, n) in merged.items()}


class ShardedValidation:
    """The manager's validation runs through an executor (the first shard is the exact subset)."""

    def __init__(self, executor: Executor, feeds: FeedSet, subset: int, labels: np.ndarray | None,
                 progress: bool = False) -> None:
        self.executor, self.labels, self.progress = executor, labels, progress
        self.shards = split(feeds, head=subset)
        self.subset = self.shards[:1]

    def describe(self) -> dict:
        return {**self.executor.describe(), "shards": len(self.shards), "worker_threads": WORKER_THREADS}

    def start(self, model: onnx.ModelProto, noise: bool = True) -> tuple[Validated, dict[str, float], float | None]:
        """The original on every shard: its sums, its float noise (on the subset, when ``noise``), its accuracy."""
        original, _, accuracy, measured = self._run(model, [], self.shards, noise=noise)
        return original, measured or {}, accuracy

    def evaluate(self, model: onnx.ModelProto, *, full: bool,
                 against: list[tuple[Validated, Tolerances, dict[str, float] | None]],
                 ) -> tuple[Validated, list[Comparison], float | None]:
        """The candidate against each (validated model, tolerances, exact-gate atols or None for a lossy
        comparison) on every shard, or on the subset; with labels, its accuracy there."""
        candidate, comparisons, accuracy, _ = self._run(model, against, self.shards if full else self.subset)
        return candidate, comparisons, accuracy

    def _run(self, model, against, shards: list[Shard], noise: bool = False):
        candidate = Validated(self.executor.put_model(model))
        jobs = tuple(_Against(v.handle, tol, atols, v.scales(shards)) for v, tol, atols in against)
        partials = self._map(shards, _Job(candidate.handle, jobs, self.labels, noise))
        for shard, partial in zip(shards, partials):
            candidate.own[shard.index] = partial.own
        comparisons = []
        for k, (_, tol, atols) in enumerate(against):
            comparison = Comparison()
            comparison.failures.extend(f"output '{n}' is missing" for n in partials[0].missing[k])
            for name in partials[0].comparisons[k]:
                merged = functools.reduce(OutputSums.merge, (p.comparisons[k][name] for p in partials))
                judge(comparison, name, merged.metrics(), tol, exact=atols is not None,
                      atol=(atols or {}).get(name, tol.exact_atol))
            comparisons.append(comparison)
        accuracy = None
        if self.labels is not None:
            hits, predicted, expected = (sum(p.hits[i] for p in partials) for i in range(3))
            if predicted != expected:
                raise InputError(f"labels: {expected} labels for {predicted} predictions")
            accuracy = hits / predicted
        return candidate, comparisons, accuracy, partials[0].noise

    def _map(self, shards: list[Shard], job: _Job) -> list[_ShardResult]:
        if not self.progress:
            return self.executor.map(_evaluate, shards, job)
        import click

        with click.progressbar(length=sum(s.stop - s.start for s in shards), label="validating",
                               file=None) as bar:
            return self.executor.map(_evaluate, shards, job, progress=bar.update)


class TrialScorer:
    """Worst output cosine of trial models against a reference model on a few samples, the trials spread
    over the executor's workers (accuracy-aware quantization). Each (trial, shard) task returns the
    shard's output sums; a trial's are merged in shard order. Each worker runs the reference once per
    shard and keeps its outputs for the trials that follow."""

    def __init__(self, executor: Executor, reference: onnx.ModelProto, feeds: FeedSet) -> None:
        self.executor, self.run = executor, uuid.uuid4().hex
        self.reference = executor.put_model(reference)
        self.shards = split(feeds)

    def cosines(self, models: list[onnx.ModelProto]) -> list[float]:
        handles = [self.executor.put_model(m) for m in models]
        partials = self.executor.map(_trial_sums, [(h, s) for h in handles for s in self.shards], self.run,
                                     self.reference)
        cosines = []
        for t in range(len(handles)):
            mine = partials[t * len(self.shards): (t + 1) * len(self.shards)]
            cosines.append(min((functools.reduce(OutputSums.merge, (p[name] for p in mine)).metrics().cosine
                                for name in mine[0]), default=1.0))
        return cosines

    def close(self) -> None:
        self.executor.drop_state(self.run)


def _trial_sums(cache: WorkerCache, item: tuple[ModelHandle, Shard], run: str, reference: ModelHandle
                ) -> dict[str, OutputSums]:
    """A worker's part of :meth:`TrialScorer.cosines`: one trial on one shard, against the reference."""
    handle, shard = item
    state = cache.state(run)
    if shard.index not in state:
        state[shard.index] = _outputs(cache, reference, shard.feeds)
    expected = state[shard.index]
    model = cache.model(handle)  # used once per shard: not kept in the worker's cache
    with Session(model, threads=WORKER_THREADS) as session:
        outputs = session_outputs(session, model, shard.feeds, join=True)
    tolerances = Tolerances()
    return {name: output_sums(values, outputs[name], tolerances, tolerances.exact_atol)
            for name, values in expected.items() if name in outputs}
