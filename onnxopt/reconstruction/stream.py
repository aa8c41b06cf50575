"""Run a model over calibration data piece by piece, so layers can be changed in order between the pieces.

Layer-wise reconstruction fits layer ``i`` on its input as computed with layers ``< i`` already
changed. Streaming the whole model once per layer costs one pass per layer; here a
:class:`LayerwiseRunner` runs only the nodes that the asked-for values still need (their ancestors
not run yet), as one onnxruntime session over a sub-graph, and keeps the values that later nodes
read (the *frontier*, per calibration batch). Asking for layer ``i``'s input therefore never runs
layer ``i`` itself, which is run later with its new weights; all asks together run every node once:
one pass over the calibration data in all, plus one session per piece.

Memory: the frontier holds the calibration batches' values at the cut (for a transformer, the
residual stream and the current activation), not every layer's output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import FeedSet
from ..errors import InputError, OnnxoptError
from ..executor import Executor, ModelHandle, Shard, WorkerCache, fetch, split
from ..graph import GraphIndex, node_uses
from ..tensors import SUBNORMAL_LAYOUTS, flush_subnormal_values, is_external
from ..validate import Session, batched, dynamic_batch
from .solvers import blas_threads
from .statistics import LayerGeometry, LayerStatistics

JOINED = 16  # samples per run when the model's batch axis is dynamic
IN_MEMORY_BYTES = 1 << 12  # constants from this size reach onnxruntime as arrays, not inside the piece
OPTIMIZED_PIECE_BYTES = 256 << 10  # pieces from this size (constants included) get onnxruntime's graph optimizations
LAYOUT_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})  # ... and pieces with these, any size
IN_MEMORY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                   onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
                   onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64}


class LayerwiseRunner:
    """Lazily computes named values of ``model`` for every calibration batch; nodes run at most once.

    The model may change between asks (weights of nodes not run yet); nodes already run are not
    run again. ``batch_size`` samples a run (0: ``JOINED`` when every input's batch axis is dynamic).
    """

    def __init__(self, model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], batch_size: int = 0,
                 sessions: WorkerCache | None = None) -> None:
        """``sessions``: a worker's cache that runners of other shards of the same run share, so that each
        piece opens one onnxruntime session per worker (the runners ask for the same values in the same order)."""
        self.model = model
        self.shared_sessions = sessions
        size = batch_size or (JOINED if isinstance(feeds, FeedSet) and dynamic_batch(model) else 1)
        self.batches = [feed for _, feed in batched(feeds, size)]
        if not self.batches:
            raise InputError("calibration: no samples")
        self.index = GraphIndex(model.graph)
        self.position = {i: p for p, i in enumerate(self.index.topological_order())}
        self.pending = set(range(len(self.index.nodes)))
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.frontier: dict[str, list[np.ndarray]] = {}
        self.outputs = [o.name for o in model.graph.output]
        self.readers = Counter(n for uses in self.index.uses for n in uses)  # pending nodes reading each value
        self.held: set[str] = set()  # computed ahead: kept until asked for or released
        self.sessions = 0
        self.version = 0  # changes applied to a worker's model (sessions are shared only within a version)

    def values(self, names: Sequence[str], ahead: Sequence[str] = ()) -> dict[str, list[np.ndarray]]:
        """Each name's value per batch, running the nodes it still needs.

        ``ahead``: values computed in the same piece and held until asked for or released: fewer,
        larger pieces where the model does not change between asks (a teacher)."""
        ahead = [n for n in ahead if n not in names and self.index.producer.get(n, -1) in self.pending]
        self._run(self._ancestors([*names, *ahead]), [*names, *ahead])
        self.held.update(ahead)
        self.held.difference_update(names)
        return {name: self._value(name) for name in names}

    def hold(self, names: Iterable[str]) -> None:
        """Keep these values once computed (even when no pending node reads them) until asked for or released."""
        self.held.update(names)

    def release(self, names: Iterable[str]) -> None:
        """Values held ahead that will not be asked for after all."""
        for name in names:
            if name in self.held:
                self.held.discard(name)
                if not self.readers[name] and name not in self.outputs:
                    self.frontier.pop(name, None)

    def statistics(self, name: str, geometry: LayerGeometry, *, bias: bool = False) -> LayerStatistics | None:
        """``XᵀX`` (``[X, 1]ᵀ[X, 1]`` with ``bias``) of the value over every batch; None when it does not have
        the layer's rows."""
        x = self.values([name])[name]
        sums = LayerStatistics.empty(geometry, bias=bias)
        with blas_threads(geometry.work(x)):  # small layers on one thread: no oversubscription
            return sums if sums.update_batches(geometry, x) else None

    def changed(self, node: onnx.NodeProto, constants: Sequence[str] = ()) -> None:
        """A layer's node or constants were changed in place: this runner reads the model as it is."""

    def ready(self, name: str) -> bool:
        """Whether the value is known without running another node (asking for it changes nothing)."""
        return not self._ancestors([name])

    def _value(self, name: str) -> list[np.ndarray]:
        if name in self.frontier:
            return self.frontier[name]
        if all(name in feed for feed in self.batches):
            return [np.asarray(feed[name]) for feed in self.batches]
        if self._initializer(name) is not None:
            return [onnx.numpy_helper.to_array(self._initializer(name))] * len(self.batches)
        raise InputError(f"the model has no value named '{name}'")

    def _initializer(self, name: str) -> onnx.TensorProto | None:
        if name not in self.initializers:  # added since: look again
            self.initializers = {t.name: t for t in self.model.graph.initializer}
        return self.initializers.get(name)

    def plan(self, asks: Sequence[str], checks: Sequence[str | None]) -> list[bool]:
        """Whether each ``checks[i]`` will be :meth:`ready` once ``asks[: i + 1]`` have been asked for in order
        (None: False); nothing runs. What a caller will decide as it goes, known before: another thread
        can then work ahead of it (:mod:`onnxopt.passes.distill`'s teacher)."""
        pending, known = set(self.pending), []
        for ask, check in zip(asks, checks):
            pending.difference_update(self._ancestors([ask], pending))
            known.append(check is not None and not self._ancestors([check], pending))
        return known

    def later(self, names: Sequence[str]) -> Callable[[], dict[str, list[np.ndarray]]]:
        """:meth:`values` as the model is now, computed when the returned function is called, in any thread:
        the piece (its nodes and constants) is copied here, so the model may change meanwhile (a model's
        outputs before a pass changes it, computed beside the pass). Ask nothing else of this runner until
        the function has returned."""
        piece = self._ancestors(names)
        prepared = self._prepare(piece, names) if piece else None

        def compute() -> dict[str, list[np.ndarray]]:
            if prepared is not None:
                self._execute(*prepared)
            return {name: self._value(name) for name in names}

        return compute

    def _ancestors(self, names: Sequence[str], pending: set[int] | None = None) -> list[int]:
        """Pending nodes the names need, in topological order (``pending``: instead of the runner's)."""
        pending = self.pending if pending is None else pending
        needed, todo = set(), [self.index.producer[n] for n in names if n in self.index.producer]
        while todo:
            i = todo.pop()
            if i in needed or i not in pending:
                continue
            needed.add(i)
            todo.extend(self.index.producer[n] for n in self.index.uses[i] if n in self.index.producer)
        return sorted(needed, key=self.position.__getitem__)

    def _run(self, piece: list[int], asked: Sequence[str]) -> None:
        if piece:
            self._execute(*self._prepare(piece, asked))

    def _prepare(self, piece: list[int], asked: Sequence[str]) -> tuple:
        """The piece as a model of its own (nodes and constants copied), marked as run; what
        :meth:`_execute` needs to run it."""
        self.pending.difference_update(piece)
        self.readers.subtract(n for i in piece for n in self.index.uses[i])
        produced = {o for i in piece for o in self.index.nodes[i].output if o}
        # uses read afresh: a layer may have gained an input (a new bias) since the index was built
        read = list(dict.fromkeys(n for i in piece for n in node_uses(self.index.nodes[i]) if n not in produced))
        kept = [n for n in dict.fromkeys([*asked, *sorted(produced)])
                if n in produced and (self.readers[n] > 0 or n in asked or n in self.outputs or n in self.held)]
        inputs = [n for n in read if self._initializer(n) is None]
        # the graph built in place: make_graph then make_model would copy every constant twice
        sub = onnx.helper.make_model(onnx.GraphProto(name="piece"), opset_imports=self.model.opset_import,
                                     ir_version=self.model.ir_version)
        sub.graph.node.extend(self.index.nodes[i] for i in piece)
        sub.graph.input.extend(_value_info(n, self._value(n)[0]) for n in inputs)
        sub.graph.output.extend(onnx.ValueInfoProto(name=n) for n in kept)
        constants, in_memory = _in_memory([self._initializer(n) for n in read if self._initializer(n) is not None])
        sub.graph.initializer.extend(constants)
        sub.functions.extend(self.model.functions)
        return sub, in_memory, piece, inputs, kept, asked, {n: self._value(n) for n in inputs}

    def _execute(self, sub: onnx.ModelProto, in_memory: dict[str, np.ndarray], piece: list[int], inputs: list[str],
                 kept: list[str], asked: Sequence[str], columns: dict[str, list[np.ndarray]]) -> None:
        """Run a prepared piece over every batch; its values join the frontier."""
        results: dict[str, list[np.ndarray]] = {n: [] for n in kept}
        optimize = graph_optimized(sub, in_memory)
        if self.shared_sessions is None:
            session = Session(sub, optimize=optimize, initializers=in_memory)
        else:  # runs of one piece on other shards follow on this worker: open it once (closed when evicted)
            session = self.shared_sessions.get(("piece", id(self.model), self.version, tuple(piece), tuple(kept)),
                                               lambda: Session(sub, optimize=optimize, initializers=in_memory))
        self.sessions += 1
        try:
            for b in range(len(self.batches)):
                out = session.run({n: columns[n][b] for n in inputs}, kept)
                for n in kept:
                    results[n].append(out[n])
        finally:
            if self.shared_sessions is None:
                session.close()
        self.frontier.update(results)
        for name in [n for n in self.frontier if self.readers[n] <= 0 and n not in self.outputs]:
            if name not in asked and name not in self.held:
                del self.frontier[name]


def graph_optimized(piece: onnx.ModelProto, in_memory: Mapping[str, np.ndarray]) -> bool:
    """Whether a piece's session gets onnxruntime's graph optimizations: they cost ~0.25 ms per session and
    pay only on pieces with work, so a small piece of MatMul / Gemm layers runs as it is (digits_mlp's distill
    opens 6 such sessions: 10 % of its time, the same model to the byte), while Conv pieces keep them
    (NCHWc layouts and fusions: ppocr_cls's distill 4 % slower without) and so do pieces of
    ``OPTIMIZED_PIECE_BYTES`` and more (a transformer's layers, whose fusions change its numbers)."""
    if any(node.op_type in LAYOUT_OPS for node in piece.graph.node):
        return True
    return piece.ByteSize() + sum(a.nbytes for a in in_memory.values()) >= OPTIMIZED_PIECE_BYTES


def _in_memory(constants: list[onnx.TensorProto]) -> tuple[list[onnx.TensorProto], dict[str, np.ndarray]]:
    """A piece's constants as the piece model holds them, and the arrays handed to onnxruntime beside it.

    Weights of ``IN_MEMORY_BYTES`` and more become external-data entries without a file, their bytes
    handed over as arrays (:class:`~onnxopt.validate.Session`): copying them into the piece and
    serializing it would cost more than the arithmetic of a piece of a transformer (MiniLM-L3: 0.4 s of
    65 MB copied twice per model run, holding the GIL that the statistics need meanwhile). Pieces that
    read data already external (a model saved beside its data) are left as they are.

    Subnormal float weights are flushed to zero on the way (:func:`~onnxopt.tensors.flush_subnormal_values`):
    the same values (see the exact ``flush-subnormals`` pass), but each x86 multiply with one takes a
    microcode assist (digits_cnn's teacher: 30 ms per run over its calibration data instead of 1.5)."""
    if any(is_external(t) for t in constants):
        return constants, {}
    kept, arrays = [], {}
    for tensor in constants:
        dtype = IN_MEMORY_TYPES.get(tensor.data_type)
        if dtype is None or not tensor.HasField("raw_data"):
            kept.append(tensor)
            continue
        array, flushed = np.frombuffer(tensor.raw_data, dtype).reshape(tuple(tensor.dims)), 0  # no copy
        if tensor.data_type in SUBNORMAL_LAYOUTS:
            array, flushed = flush_subnormal_values(array, tensor.data_type)
        if array.nbytes < IN_MEMORY_BYTES:
            kept.append(numpy_helper.from_array(array, tensor.name) if flushed else tensor)
            continue
        arrays[tensor.name] = array
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="in-memory")
        kept.append(stub)
    return kept, arrays


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    array = np.asarray(array)
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                              [None] * array.ndim)


def input_statistics(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]],
                     layers: Mapping[str, LayerGeometry], batch_size: int = 0, *, bias: bool = True,
                     executor: Executor | None = None, noise: bool = False) -> dict[str, LayerStatistics]:
    """``[X, 1]ᵀ[X, 1]`` of each named layer input (with its geometry) over the calibration data, in one pass
    (the ones column gives input sums: :meth:`LayerStatistics.centered` needs them; ``bias=False``: ``XᵀX``;
    ``noise``: with the sums :meth:`LayerStatistics.shrinkage` needs).

    For solvers that work on the original model's inputs (learned rounding, GPTQ); layers that must see
    their predecessors' changes use :class:`LayerwiseRunner` instead. With an ``executor``, each shard
    of a FeedSet is summed on a worker and the partials merged in shard order (the same sums for any
    number of workers).
    """
    size = batch_size or (JOINED if isinstance(feeds, FeedSet) and dynamic_batch(model) else 1)
    inputs = {i.name for i in model.graph.input}
    job = _InputJob(None, dict(layers), tuple(n for n in layers if n not in inputs), size, bias, noise)
    if executor is None or not isinstance(feeds, FeedSet):
        with Session(model, extra_outputs=list(job.fetched), optimize=True) as session:
            return _input_sums(session, feeds, job)
    shards = split(feeds)
    if not shards:
        raise InputError("calibration: no samples")
    partials = executor.map(_input_shard, shards, dataclasses.replace(job, model=executor.put_model(model)))
    return {name: functools.reduce(LayerStatistics.merge, (p[name] for p in partials)) for name in layers}


@dataclass(frozen=True)
class _InputJob:
    """What :func:`input_statistics` sums (``model``: the handle a worker opens)."""

    model: ModelHandle | None
    layers: dict[str, LayerGeometry]
    fetched: tuple[str, ...]
    batch_size: int
    bias: bool
    noise: bool = False


def _input_sums(session: Session, feeds: Iterable[Mapping[str, np.ndarray]], job: _InputJob
                ) -> dict[str, LayerStatistics]:
    sums = {name: LayerStatistics.empty(geometry, bias=job.bias, noise=job.noise) for name, geometry in job.layers.items()}
    fetched = list(job.fetched)
    for _, feed in batched(feeds, job.batch_size):
        values = session.run(feed, fetched) if fetched else {}
        for name, geometry in job.layers.items():
            sums[name].update(geometry, values[name] if name in values else feed[name])
    return sums


def _input_shard(cache: WorkerCache, shard: Shard, job: _InputJob) -> dict[str, LayerStatistics]:
    """A worker's part of :func:`input_statistics`: one shard's sums (BLAS on one thread, as every worker)."""
    from threadpoolctl import threadpool_limits

    model = cache.get(("model", job.model.key), lambda: cache.model(job.model))
    session = cache.get(("inputs", job.model.key, job.fetched),
                        lambda: Session(model, extra_outputs=list(job.fetched), optimize=True))
    with threadpool_limits(limits=1, user_api="blas"):
        return _input_sums(session, shard.feeds, job)


@dataclass(frozen=True)
class _Change:
    """A layer's node (by position) and its constant inputs as they are after the layer was changed."""

    nodes: dict[int, bytes]
    initializers: dict[str, bytes]


@dataclass(frozen=True)
class _RunnerJob:
    run: str
    model: ModelHandle
    teacher: ModelHandle | None
    changes: tuple  # every change so far, shared (a restarted worker replays them all)
    batch_size: int
    task: Callable  # task(shard's runners, *args): a module-level function
    args: tuple


@dataclass
class ShardRunners:
    """What one calibration shard keeps on its worker: the model's runner, the teacher's (when there is
    one), and what tasks leave for the next task on the same layer (``kept``)."""

    model: LayerwiseRunner
    teacher: LayerwiseRunner | None
    kept: dict

    def held(self, key: str, *, pop: bool = False):
        """What an earlier task of this pass left in ``kept``; a worker restarted since has lost it, and
        the pass cannot rebuild it from the changes it replays, so it stops with one clear message."""
        if key not in self.kept:
            raise OnnxoptError(f"a worker restarted in the middle of a layer and lost its shard's {key!r}; "
                               "run again (or without --executor)")
        return self.kept.pop(key) if pop else self.kept[key]


class ShardedRunner:
    """:class:`LayerwiseRunner` spread over an executor's workers: the same layer-by-layer statistics.

    Each shard of the calibration data has its own runner on one worker (``pinned`` maps), which keeps
    that shard's frontier: activations stay where they were computed, only a layer's ``XᵀX`` per shard
    comes back, merged in shard order (the same sums for any number of workers). The caller's
    changes to a layer (:meth:`changed`) travel to every worker before the next layer's statistics.
    """

    def __init__(self, executor: Executor, model: onnx.ModelProto, feeds: FeedSet, batch_size: int = 0,
                 teacher: onnx.ModelProto | None = None) -> None:
        """``teacher``: a second model that each shard also runs layer by layer (never changed)."""
        self.executor, self.model = executor, model
        self.shards = split(feeds)
        if not self.shards:
            raise InputError("calibration: no samples")
        self.batch_size = batch_size or (JOINED if dynamic_batch(model) else 1)
        self.run = uuid.uuid4().hex
        self.handle = executor.put_model(model)
        self.teacher = None if teacher is None else executor.put_model(teacher)
        self.changes: list = []
        self.producer = GraphIndex(model.graph).producer  # a node's position, by its (unique) first output
        self.initializers = {t.name: t for t in model.graph.initializer}

    def statistics(self, name: str, geometry: LayerGeometry, *, bias: bool = False) -> LayerStatistics | None:
        """Like :meth:`LayerwiseRunner.statistics`, each shard's part summed where its activations are."""
        partials = self.map(_layer_gram, name, geometry, bias)
        if any(p is None for p in partials):
            return None
        return functools.reduce(LayerStatistics.merge, partials)

    def pair_statistics(self, name: str, output: str, geometry: LayerGeometry, *, bias: bool = False
                        ) -> LayerStatistics | None:
        """The layer's statistics with ``cross`` against the teacher's input of it
        (:meth:`LayerStatistics.update_pair`: the teacher's output as the target), each shard's part summed
        where its activations are. While no shard's input differs from the teacher's (nothing upstream
        changed yet), plain statistics, as :class:`LayerwiseRunner` callers do in this process."""
        drifted = any(self.map(_hold_pair, name, output))
        partials = self.map(_pair_gram, name, output, geometry, bias, drifted)
        if any(p is None for p in partials):
            return None
        return functools.reduce(LayerStatistics.merge, partials)

    def map(self, task: Callable, *args) -> list:
        """``task(ShardRunners, *args)`` on every shard, on the worker that holds its runners (the changes
        so far applied first); results in shard order."""
        job = _RunnerJob(self.run, self.handle, self.teacher, tuple(self.changes), self.batch_size, task, args)
        return self.executor.map(_runner_task, self.shards, job, pinned=True)

    def changed(self, node: onnx.NodeProto, constants: Sequence[str] = ()) -> None:
        """Send the node and its constant inputs (initializers, Constant nodes), and the named ``constants``
        it does not read (a MatMul's bias in the Add after it), as they are now."""
        graph = self.model.graph
        names = [n for n in dict.fromkeys([*node.input, *constants]) if n]
        if any(n not in self.initializers and n not in self.producer for n in names):  # a new bias
            self.initializers = {t.name: t for t in graph.initializer}
        initializers = {n: self.initializers[n] for n in names if n in self.initializers}
        nodes = {self.producer[node.output[0]]: node.SerializeToString()}
        for name in names:
            producer = self.producer.get(name)
            if name not in initializers and producer is not None and graph.node[producer].op_type == "Constant":
                nodes[producer] = graph.node[producer].SerializeToString()
        self.changes.append(self.executor.share(_Change(nodes, {n: t.SerializeToString()
                                                                for n, t in initializers.items()})))

    def close(self) -> None:
        """Drop the runners' state on the workers."""
        self.executor.drop_state(self.run)


def _runner_task(cache: WorkerCache, shard: Shard, job: _RunnerJob):
    """A worker's part of :meth:`ShardedRunner.map`: the shard's runners, the changes so far, then the task
    (BLAS on one thread, as in every worker)."""
    from threadpoolctl import threadpool_limits

    state = cache.state(job.run)
    if "model" not in state:  # a fresh (or restarted) worker: the model as sent, then every change so far
        state["model"], state["applied"] = cache.model(job.model), 0
        state["initializers"] = {t.name: t for t in state["model"].graph.initializer}
        state["teacher"] = None if job.teacher is None else cache.model(job.teacher)
    model = state["model"]
    for change in job.changes[state["applied"]:]:
        _apply_change(model, state["initializers"], fetch(change))
        state["applied"] += 1
    runners = state.get(shard.index)
    if runners is None:
        runners = state[shard.index] = ShardRunners(
            LayerwiseRunner(model, shard.feeds, job.batch_size, sessions=cache),
            None if state["teacher"] is None else LayerwiseRunner(state["teacher"], shard.feeds, job.batch_size,
                                                                  sessions=cache), {})
    runners.model.version = state["applied"]
    with threadpool_limits(limits=1, user_api="blas"):
        return job.task(runners, *job.args)


def _hold_pair(runners: ShardRunners, name: str, output: str) -> bool:
    """The shard's input of a layer and the teacher's (kept for :func:`_pair_gram`); whether they differ.
    The teacher also runs the layer's output, so that its frontier moves past the layer."""
    x = runners.model.values([name])[name]
    reference = runners.teacher.values([name, output])[name]
    runners.kept["pair"] = (x, reference)
    return not all(np.array_equal(a, b) for a, b in zip(x, reference))


def _pair_gram(runners: ShardRunners, name: str, output: str, geometry: LayerGeometry, bias: bool,
               drifted: bool) -> LayerStatistics | None:
    if "pair" not in runners.kept:  # a worker restarted since: its runners were rebuilt
        _hold_pair(runners, name, output)
    x, reference = runners.kept.pop("pair")
    sums = LayerStatistics.empty(geometry, bias=bias)
    fitted = sums.update_pair(geometry, x, reference) if drifted else sums.update_batches(geometry, x)
    return sums if fitted else None


def _layer_gram(runners: ShardRunners, name: str, geometry: LayerGeometry, bias: bool) -> LayerStatistics | None:
    x = runners.model.values([name])[name]
    sums = LayerStatistics.empty(geometry, bias=bias)
    return sums if sums.update_batches(geometry, x) else None


def _apply_change(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto], change: _Change) -> None:
    """In place: the runners hold references to these nodes and initializers."""
    for position, node in change.nodes.items():
        model.graph.node[position].CopyFrom(onnx.NodeProto.FromString(node))
    for name, tensor in change.initializers.items():
        if name not in initializers:
            initializers[name] = model.graph.initializer.add()
        initializers[name].CopyFrom(onnx.TensorProto.FromString(tensor))
