"""The executor seam: data-parallel work (validation metrics, calibration statistics) over shards.

A task is a module-level function ``fn(cache, shard, *shared) -> partial``; an executor runs it on
every shard and returns the partials *in shard order*, so the caller merges them in a fixed order
and any number of workers gives the same answer. Shards have a fixed size (:func:`split`), not one
per worker: the sums inside a shard never depend on how many workers there are.

- :class:`InProcess` runs the tasks one after the other in this process (no new dependency).
- :class:`RayExecutor` runs them on Ray actors, one per worker (``pip install "onnxopt[ray]"``), on a
  local Ray instance or an existing cluster (``address="auto"`` or ``HOST:PORT``). A worker that dies
  is restarted and its task retried; a task that fails for a data reason fails the run with the
  error the in-process run raises.

Models travel as :class:`ModelHandle`: serialized once into Ray's object store (or, with external
data or over 2 GB, by path), fetched and opened once per worker and kept in the worker's
:class:`WorkerCache`.
"""

from __future__ import annotations

import collections
import itertools
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .data import FeedSet
from .errors import InputError, OnnxoptError
from .modelio import load_model, needs_file, save_scratch

PACKAGE = Path(__file__).resolve().parent
SHARD_SAMPLES = 64  # samples per shard: fixed, so partial sums do not depend on the number of workers
CACHE_ENTRIES = 6  # sessions a worker keeps open (original, previous, candidate, and their optimized twins)
RETRIES = 3  # restarts of a dead Ray worker, and retries of the task it was running


@dataclass(frozen=True)
class Shard:
    """Samples ``[start, stop)`` of the data set (``feeds``: that window, read where it is processed)."""

    index: int
    start: int
    stop: int
    feeds: FeedSet


def split(feeds: FeedSet, size: int | None = None, head: int = 0) -> list[Shard]:
    """Consecutive shards of ``size`` samples (SHARD_SAMPLES); with ``head``, the first shard is the first
    ``head`` samples (validation checks runs of exact steps on those alone)."""
    size = size or SHARD_SAMPLES
    bounds = [0, *([min(head, len(feeds))] if head else []),
              *range((head or 0) + size, len(feeds), size), len(feeds)]
    bounds = list(dict.fromkeys(bounds))
    return [Shard(i, a, b, feeds.window(a, b)) for i, (a, b) in enumerate(itertools.pairwise(bounds)) if b > a]


@dataclass(frozen=True)
class ModelHandle:
    """A model as workers receive it: ``source`` is serialized bytes, a path, or a Ray object reference
    to the bytes; ``key`` names it in worker caches."""

    key: str
    source: Any


def fetch(source: Any) -> Any:
    """A value as :meth:`Executor.share` sent it (a Ray object reference is resolved where it is used)."""
    if type(source).__name__ == "ObjectRef":
        import ray

        return ray.get(source)
    return source


class WorkerCache:
    """What a worker keeps between tasks: opened models and sessions, least recently used dropped first."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._state: dict = {}
        self._state_run: str | None = None

    def get(self, key, make: Callable[[], Any]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.entries:
            _, old = self._items.popitem(last=False)
            if hasattr(old, "close"):
                old.close()
        return value

    def model(self, handle: ModelHandle) -> onnx.ModelProto:
        """The handle's model, fetched (from the object store, or loaded from its path) once per worker."""
        source = fetch(handle.source)
        if isinstance(source, str):
            return load_model(source)
        return onnx.ModelProto.FromString(source)

    def state(self, run: str) -> dict:
        """What a stateful run (layer-wise statistics) keeps on this worker between its maps; a worker
        holds one run's state, so a new run drops an older one (a run that failed before it finished)."""
        if self._state_run != run:
            self._state, self._state_run = {}, run
        return self._state

    def drop_state(self, run: str) -> None:
        if self._state_run == run:
            self._state, self._state_run = {}, None

    def close(self) -> None:
        while self._items:
            _, old = self._items.popitem()
            if hasattr(old, "close"):
                old.close()


class Executor:
    """Runs ``fn(cache, shard, *shared)`` on every shard; results come back in shard order."""

    name = "in-process"
    workers = 1

    def __init__(self) -> None:
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.tasks = 0  # shards processed, all maps together (the report records it)

    def put_model(self, model: onnx.ModelProto) -> ModelHandle:
        """A snapshot of ``model`` for workers (later in-place changes to it do not reach them)."""
        key = uuid.uuid4().hex
        if needs_file(model):  # external data or over 2 GB: by path (a shared folder for a multi-machine cluster)
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="onnxopt-exec-")
            path = Path(self._scratch.name) / key / "model.onnx"
            path.parent.mkdir()
            save_scratch(model, path)
            return ModelHandle(key, str(path))
        return ModelHandle(key, self.share(model.SerializeToString()))

    def share(self, value: Any) -> Any:
        """``value`` for tasks to :func:`fetch`: sent to each worker once (Ray's object store), not with every task."""
        return value

    def map(self, fn: Callable, shards: Sequence, *shared, progress: Callable[[int], None] | None = None,
            pinned: bool = False) -> list:
        """``[fn(cache, shard, *shared) for shard in shards]``, computed wherever the executor runs tasks.

        ``shards`` are :class:`Shard` objects or other work items (trials: progress counts them one
        each). ``pinned``: item ``i`` always runs on worker ``i % workers``, so a task finds the state
        (:meth:`WorkerCache.state`) its item's earlier tasks left there."""
        self.tasks += len(shards)
        return self._map(fn, shards, shared, progress, pinned)

    def _map(self, fn, shards, shared, progress, pinned) -> list:
        raise NotImplementedError

    def drop_state(self, run: str) -> None:
        """Drop what a stateful run left on the workers (:meth:`WorkerCache.state`)."""
        self.map(_drop_state, range(self.workers), run, pinned=True)
        self.tasks -= self.workers

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.workers, "tasks": self.tasks}

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(Executor):
    """Tasks one after the other in this process, with one worker cache."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = WorkerCache()

    def _map(self, fn, shards, shared, progress, pinned) -> list:
        results = []
        for shard in shards:
            results.append(fn(self.cache, shard, *shared))
            if progress:
                progress(_size(shard))
        return results

    def close(self) -> None:
        self.cache.close()
        super().close()


def _drop_state(cache: WorkerCache, worker: int, run: str) -> None:
    cache.drop_state(run)


def _size(item) -> int:
    """What a finished item adds to a progress bar: a shard's samples, else one."""
    return item.stop - item.start if isinstance(item, Shard) else 1


class _RayWorker:
    """One Ray actor: runs tasks with its own cache (models fetched once per worker)."""

    def __init__(self) -> None:
        self.cache = WorkerCache()

    def run(self, fn, shard, shared):
        return fn(self.cache, shard, *shared)

    def peak_rss(self) -> int:
        """This worker's peak resident memory in bytes (Linux ru_maxrss is in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu_seconds(self) -> float:
        """CPU time this worker process has used (user + system): its share of the work, whatever the load."""
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


class RayExecutor(Executor):
    """Tasks on ``workers`` Ray actors (one CPU each): a local Ray instance (``address=None``, started
    with ``workers`` CPUs when none is running) or an existing cluster (``"auto"`` or ``HOST:PORT``)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        super().__init__()
        try:
            import ray
        except ImportError:
            raise InputError('--executor ray needs Ray: pip install "onnxopt[ray]"') from None
        self._ray = ray
        self._started = not ray.is_initialized()  # shut down on close only a Ray instance started here
        if self._started:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "logging_level": "error"}
            if address:  # a cluster's workers import onnxopt from here (uploaded once), whatever is installed there
                options["runtime_env"] = {"py_modules": [str(PACKAGE)]}
            else:
                options["num_cpus"] = workers or os.cpu_count()
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"--ray-address {address}: cannot connect to a Ray cluster ({exc})") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(workers or cpus, cpus))
        # workers on this machine import this onnxopt, installed or not (in a Ray instance started by the caller too)
        actor = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES,
                           runtime_env={"env_vars": {"PYTHONPATH": str(PACKAGE.parent)}})(_RayWorker)
        self.actors = [actor.remote() for _ in range(self.workers)]

    def share(self, value: Any) -> Any:
        return self._ray.put(value)

    def _map(self, fn, shards, shared, progress, pinned) -> list:
        """Each worker takes the next shard when it finishes one (``pinned``: the next of its own);
        partials are returned in shard order."""
        ray = self._ray
        queues = {id(a): collections.deque() for a in self.actors}
        for position, shard in enumerate(shards):
            queue = queues[id(self.actors[position % len(self.actors)])] if pinned else queues[id(self.actors[0])]
            queue.append((position, shard))
        results: list[Any] = [None] * len(shards)
        running: dict[Any, tuple[int, Any, Any]] = {}

        def submit(actor) -> None:
            queue = queues[id(actor)] if pinned else queues[id(self.actors[0])]
            if queue:
                position, shard = queue.popleft()
                running[actor.run.remote(fn, shard, shared)] = (position, actor, shard)

        for actor in self.actors:
            submit(actor)
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                position, actor, shard = running.pop(done[0])
                results[position] = self._get(done[0])
                if progress:
                    progress(_size(shard))
                submit(actor)
        finally:
            for ref in running:
                ray.cancel(ref)
        return results

    def _get(self, ref):
        """A task's result; a task's own error as the in-process run raises it."""
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, OnnxoptError):
                raise type(cause)(str(cause)) from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise OnnxoptError(f"a Ray worker died {RETRIES + 1} times: {str(exc).splitlines()[0]}") from None

    def peak_memory(self) -> list[int]:
        """Peak resident bytes of each worker process."""
        return self._ray.get([a.peak_rss.remote() for a in self.actors])

    def cpu_seconds(self) -> list[float]:
        """CPU seconds each worker process has used."""
        return self._ray.get([a.cpu_seconds.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._started:
            self._ray.shutdown()
        super().close()


EXECUTORS = ("in-process", "ray")


def make_executor(executor: str | Executor | None, address: str | None = None,
                  workers: int | None = None) -> Executor | None:
    """None for the default in-process validation (outputs held in memory); else an executor."""
    if isinstance(executor, Executor):
        return executor
    if executor in (None, "in-process"):
        if address or workers:
            raise InputError(f"{'--ray-address' if address else '--workers'} needs --executor ray")
        return None
    if executor == "ray":
        return RayExecutor(address, workers)
    raise InputError(f"executor '{executor}': expected one of {', '.join(EXECUTORS)}")
