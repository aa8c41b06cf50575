"""distill: repair the optimized model (the student) against the original (the teacher) on real data.

Knowledge distillation in the form a graph tool can do it. Layer by layer, in topological order,
each MatMul / Gemm / Conv is refit by ridge least squares (:mod:`onnxopt.reconstruction`) so that,
fed the student's own input (earlier layers already repaired), it reproduces the teacher's value
of the same name after the bias. Conv layers are refit whole, weights and bias, through their
unfolded inputs (grouped and depthwise too); a Conv without a bias gets one.

Student and teacher each run once over the calibration data, piece by piece
(:class:`~onnxopt.reconstruction.stream.LayerwiseRunner`): each layer's input is computed just
before it is fit, and the layer itself runs with its new weights; the teacher, which does not
change, computes the targets of several layers per piece (up to ``PREFETCH_BYTES`` held). In this
process the teacher's pieces run in a thread ahead of the layers (:class:`_Teacher`: the same asks in
the same order, so the same values; not when attention pairs ask the teacher for scores between the
layers), and so does the unchanged student's end-to-end run for the keep-the-better check below: on
two cores, statistics and fits here overlap both (small models, whose threads would cost more than they
overlap, run both here when needed). With an
executor, each calibration shard's runners live on one worker
(:class:`~onnxopt.reconstruction.stream.ShardedRunner`), which sums the shard's statistics; the fits
run here. Statistics are float64 sums (``XᵀX``, ``XᵀY``), so memory does not grow with the number of
samples beyond the values at the current cut.

The ridge pulls toward the current weights, not toward zero: with fewer calibration rows than
inputs, the directions the data does not see keep the student's values instead of collapsing.
Zeros from pruning stay zero (each output column is solved over its nonzero inputs, all columns at
once; an all-zero column, a pruned neuron, is left alone, bias included). A query / key pair feeding one
softmax attention is then refit together to the teacher's attention scores
(:mod:`onnxopt.reconstruction.attention`): what matters of their error is what reaches the softmax. A layer's change is kept
only if it lowers the layer's own error against the teacher; and the whole repair is kept only if
the model's output error against the teacher on the calibration data goes down: otherwise the
student is returned unchanged (``reverted_whole``), so distill never makes a model worse on it.
"""

from __future__ import annotations

import fnmatch
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import FeedSet
from ..errors import InputError
from ..graph import (STANDARD_DOMAINS, ConstantResolver, GraphIndex, WeightStore, defined_names, node_subgraphs,
                     opset_version, unique_name_factory, walk_nodes)
from ..reconstruction import LayerGeometry, LayerStatistics, blas_threads, masked_refit
from ..reconstruction.attention import (AttentionScores, find_attention, layout_matches, local_scores,
                                        refit_query_key)
from ..reconstruction.stream import LayerwiseRunner, ShardedRunner, ShardRunners
from ..tensors import FLOAT_TYPES
from ..validate import numeric_values
from .base import Pass, PassResult, count
from .weights import WeightUse, attribute, from_canonical, to_canonical, weight_use

LAYER_OPS = ("MatMul", "Gemm", "Conv")
MATCHED = 1e-5  # relative error below which a layer already reproduces its target (float32 rounding)
PREFETCH_BYTES = 128 << 20  # teacher values computed ahead of their layers (fewer onnxruntime pieces)
NEAR = 0.01  # relative error (from the sums) below which the current weights' error is measured exactly
THREADED_TEACHER_WORK = 1e8  # multiply-adds (at least) from which the teacher and the unchanged student get threads


@dataclass(eq=False)
class Layer:
    """A MatMul / Gemm / Conv whose output after its bias must match the teacher's ``target``.

    Weights are solved as ``(groups, inputs [+1 bias row], outputs per group)``; Gemm's
    ``alpha`` / ``beta`` scale them (``y = alpha x W + beta bias``). A Conv without a bias gets one.
    """

    store: WeightStore
    use: WeightUse
    target: str
    bias: str | None
    geometry: LayerGeometry
    new_name: Callable[[str], str]
    alpha: float = 1.0
    beta: float = 1.0
    stream: tuple[str, str] | None = None  # (sum, residual): the layer's output is added to a residual stream

    @property
    def name(self) -> str:
        return self.use.node.name or self.target

    @property
    def with_bias(self) -> bool:
        return self.bias is not None or self.geometry.is_conv

    def statistics(self, xs: list[np.ndarray], ys: list[np.ndarray], gram: np.ndarray | None) -> LayerStatistics | None:
        """Statistics against the teacher (``gram`` given: that of a layer reading the same input);
        None when the target does not have the layer's rows and width. Near a match the error of
        the current weights is measured exactly (the sums alone lose it to float32 rounding)."""
        sums = LayerStatistics.empty(self.geometry, bias=self.with_bias, target=True)
        if not sums.update_batches(self.geometry, xs, ys, gram=gram is None):
            return None
        if gram is not None:
            sums.gram = gram
        sums.anchor(self.current()[1], NEAR, lambda start: sums.start_error(self.geometry, xs, ys, start))
        return sums

    @property
    def width(self) -> int:
        """Output channels (all groups)."""
        return self.geometry.groups * self.geometry.outputs

    @property
    def rows(self) -> _LayerRows:
        return _LayerRows(self.use.data, self.target, self.stream, self.geometry, self.with_bias)

    @property
    def reads(self) -> tuple:
        """What determines the layer's gram: layers with equal ``reads`` share it (Q, K, V of one block)."""
        return self.use.data, self.geometry, self.with_bias

    def current(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored arrays, and the effective weights ``(G, K [+1], N/G)``."""
        old = {n: self.store.array(n) for n in (self.use.weight, self.bias) if n}
        canonical = to_canonical(old[self.use.weight], self.use).astype(np.float64) * self.alpha
        g = self.geometry
        start = np.swapaxes(canonical.reshape(g.groups, g.outputs, g.inputs), 1, 2)
        if self.with_bias:
            bias = (old[self.bias].astype(np.float64).reshape(-1) * self.beta if self.bias
                    else np.zeros(g.groups * g.outputs))
            start = np.concatenate([start, bias.reshape(g.groups, 1, g.outputs)], axis=1)
        return old, start

    def write(self, solved: np.ndarray, old: dict[str, np.ndarray]) -> Callable[[], None]:
        """Store solved weights (and bias); return what undoes it."""
        g, weight = self.geometry, old[self.use.weight]
        kernel = to_canonical(weight, self.use).shape
        canonical = np.swapaxes(solved[:, : g.inputs], 1, 2).reshape(kernel) / self.alpha
        self.store.set_array(self.use.weight, from_canonical(canonical, self.use).astype(weight.dtype))
        node, inputs, added = self.use.node, list(self.use.node.input), None
        if self.with_bias:
            bias = solved[:, g.inputs].reshape(-1) / self.beta
            if self.bias:
                self.store.set_array(self.bias, bias.reshape(old[self.bias].shape).astype(old[self.bias].dtype))
            else:
                added = self.new_name(f"{self.name}_bias")
                self.store.add_initializer(added, bias.astype(weight.dtype))
                del node.input[2:]
                node.input.append(added)

        def undo() -> None:
            for name, array in old.items():
                self.store.set_array(name, array)
            if added:
                del node.input[:]
                node.input.extend(inputs)
                _remove_initializer(self.store, added)

        return undo

    def fit(self, sums: LayerStatistics, options) -> tuple[Callable[[], None] | None, dict]:
        """Refit from the statistics; ``(undo, row for the report)``, undo None when nothing changed
        (already matched, or the fit would not lower the layer's error)."""
        old, start = self.current()
        start = start if sums.start is None else sums.start
        before = sums.residual(start)
        row = {"name": self.name, "op": self.use.node.op_type, "rel_err_before": _relative(before, sums)}
        if before <= MATCHED**2 * sums.target_sq:
            return None, {**row, "result": "matched"}
        keep = None
        if options.keep_zeros:
            keep = start != 0
            if self.with_bias:
                keep[:, -1] = keep[:, :-1].any(axis=1)  # a pruned neuron keeps its bias too
        solved, damping = masked_refit(sums.gram, sums.cross, start, keep, options.damping)  # all groups at once
        after = sums.residual(solved)
        row.update(rel_err_after=_relative(after, sums), damping=damping)
        if not after < before:
            return None, {**row, "result": "reverted"}
        return self.write(solved, old), {**row, "result": "refit"}


def _relative(residual: float, sums: LayerStatistics) -> float:
    return float(np.sqrt(max(residual, 0.0) / sums.target_sq)) if sums.target_sq else 0.0


class Distill(Pass):
    name = "distill"
    summary = "refit MatMul/Gemm/Conv weights and biases (zeros kept) to match the original model on calibration data"
    exact = False

    @dataclass(frozen=True)
    class Options:
        damping: float = 0.1
        keep_zeros: bool = True
        op_types: tuple[str, ...] = LAYER_OPS
        exclude: tuple[str, ...] = ()
        max_layers: int = 0
        batch_size: int = 0  # samples per run; 0: joined when the batch axis is dynamic
        attention: bool = True  # refit query / key pairs to the teacher's attention scores (softmax metric)
        attention_steps: int = 2  # flexible conjugate-gradient steps per side (at most: a step that gains little ends it)

        def __post_init__(self) -> None:
            if not self.damping > 0:
                raise InputError(f"distill: damping must be > 0 (relative to the mean input energy), not {self.damping}")
            unknown = [op for op in self.op_types if op not in LAYER_OPS]
            if unknown or not self.op_types:
                raise InputError(f"distill: op_types must be some of {'|'.join(LAYER_OPS)}, not "
                                 f"'{'|'.join(self.op_types)}'")
            if self.max_layers < 0:
                raise InputError(f"distill: max_layers must be >= 0 (0 = all), not {self.max_layers}")
            if self.batch_size < 0:
                raise InputError(f"distill: batch_size must be >= 0 (0 = automatic), not {self.batch_size}")
            if self.attention_steps < 1:
                raise InputError(f"distill: attention_steps must be >= 1, not {self.attention_steps}")

    def requires(self, model: onnx.ModelProto) -> None:
        self.context.calibration_feeds(self.name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        teacher = self.context.teacher_model(self.name)
        feeds = self.context.calibration_feeds(self.name)
        stats: dict[str, int | float] = {"layers_refit": 0, "layers_reverted": 0}
        layers = self._layers(model, teacher, stats)
        executor = self.context.executor
        runs = (_ShardedRuns(executor, model, teacher, feeds, self.options.batch_size)
                if executor is not None and isinstance(feeds, FeedSet) else
                _Runs(model, teacher, feeds, self.options.batch_size, layers))
        try:
            return self._repair(model, layers, runs, stats)
        finally:
            runs.close()  # the in-process runs' threads too, when a layer failed

    def _repair(self, model: onnx.ModelProto, layers: list[Layer], runs, stats: dict) -> PassResult:
        """Refit the layers in order; keep the whole repair only if the output error went down."""
        outputs = [o.name for o in model.graph.output]
        undo: list[Callable[[], None]] = []
        rows = []
        pairs = self._attention_pairs(model, layers, runs, stats) if self.options.attention else {}
        shared = None  # (reads, gram) of the last layer: the next one reuses the gram when it reads the same input
        for number, layer in enumerate(layers, 1):
            start = time.perf_counter()
            reuse = shared is not None and shared[0] == layer.reads
            sums, work = runs.statistics(layer, shared[1] if reuse else None, stats)
            if sums is None:
                count(stats, "skipped_width_mismatch")
                continue
            shared = (layer.reads, sums.gram)
            with blas_threads(work):  # small layers on one thread: no oversubscription
                change, row = layer.fit(sums, self.options)
            stats_key = {"refit": "layers_refit", "reverted": "layers_reverted", "matched": "layers_matched"}
            count(stats, stats_key[row["result"]])
            if row.get("damping", self.options.damping) > self.options.damping:
                count(stats, "damping_raised")
            if change is not None:
                undo.append(change)
                runs.changed(layer.use.node, [layer.bias] if layer.bias else [])
            rows.append({**row, "seconds": round(time.perf_counter() - start, 4)})
            if layer in pairs:
                rows.append(self._fit_attention(*pairs[layer], runs, stats, undo))
            if self.context.progress:
                import click

                for done in rows[-1 - (layer in pairs):]:  # the layer's row, and its attention's
                    before = done.get("rel_err_before", float("nan"))
                    click.echo(f"distill: layer {number}/{len(layers)} {done['name']}: {done['result']} "
                               f"({before:.4f} -> {done.get('rel_err_after', before):.4f}, {done['seconds']:.2f} s)",
                               err=True)
        stats["calib_rel_err_before"], stats["calib_rel_err_after"] = error, _ = runs.output_errors(outputs)
        if undo and not stats["calib_rel_err_after"] < error:
            for change in reversed(undo):
                change()
            stats["reverted_whole"] = 1  # the output got no closer to the teacher: the student is kept as it was
            stats["calib_rel_err_after"] = error
            undo = []
        stats["pieces_run"] = runs.pieces()
        return PassResult(model, bool(undo), stats, {"layers": rows})

    def _attention_pairs(self, model: onnx.ModelProto, layers: list[Layer], runs, stats) -> dict:
        """``{the later of a query / key pair: (query layer, key layer, attention)}``; their rows are kept."""
        by_target = {layer.target: layer for layer in layers  # rows in order: features on the last axis
                     if not layer.geometry.is_conv and (layer.use.data_axis == -1 or (
                         layer.use.node.op_type == "Gemm" and not attribute(layer.use.node, "transA", 0)))}
        index = GraphIndex(model.graph)
        found = find_attention(index, ConstantResolver(index, WeightStore(model.graph), opset_version(model)),
                               {target: layer.width for target, layer in by_target.items()})
        position = {layer: i for i, layer in enumerate(layers)}
        pairs = {}
        for attention in found:
            query, key = by_target[attention.query], by_target[attention.key]
            pairs[max(query, key, key=position.__getitem__)] = (query, key, attention)
            runs.keep_rows.update((query.target, key.target))
        runs.hold_teacher({later: [pair[2].scores, pair[2].probabilities] for later, pair in pairs.items()})
        return pairs

    def _fit_attention(self, query: Layer, key: Layer, attention: AttentionScores, runs, stats, undo) -> dict:
        """Refit the key, then the query, to the teacher's scores (:mod:`onnxopt.reconstruction.attention`);
        kept when the Fisher-weighted score error goes down. The report row."""
        start = time.perf_counter()
        row = {"name": f"attention {attention.scores}", "op": "Attention", "seconds": 0.0}
        problem, work = runs.attention(_AttentionPair(query.rows, key.rows, query.use.node.output[0],
                                                      key.use.node.output[0], attention))
        if isinstance(problem, str):
            count(stats, f"attention_{problem}")
            return {**row, "result": "skipped"}
        (old_q, wq), (old_k, wk) = query.current(), key.current()
        keep = tuple(w[0] != 0 if self.options.keep_zeros else np.ones(w[0].shape, bool) for w in (wq, wk))
        if query.with_bias:
            keep[0][-1] = keep[0][:-1].any(axis=0)
        if key.with_bias:
            keep[1][-1] = False  # a key bias shifts a query's whole row of scores: the softmax ignores it
        with blas_threads(work * self.options.attention_steps):
            fit = refit_query_key(problem, (wq[0], wk[0]), keep, self.options.attention_steps)
        row.update(rel_err_before=fit.error_before, rel_err_after=fit.error_after,
                   seconds=round(time.perf_counter() - start, 4))
        if not fit.error_after < fit.error_before:
            count(stats, "attention_reverted")
            return {**row, "result": "reverted"}
        for layer, solved, old in ((query, fit.query, old_q), (key, fit.key, old_k)):
            undo.append(layer.write(solved[None], old))
            runs.changed(layer.use.node, [layer.bias] if layer.bias else [])
        count(stats, "attention_refit")
        return {**row, "result": "refit"}

    def _layers(self, model: onnx.ModelProto, teacher: onnx.ModelProto, stats) -> list:
        """The student's repairable layers in topological order; every other candidate counted as a skip."""
        graph = model.graph
        index, store = GraphIndex(graph), WeightStore(graph)
        taught = defined_names(teacher.graph)
        new_name = unique_name_factory(model)
        ops = self.options.op_types
        nested = sum(1 for node in graph.node for sub in node_subgraphs(node) for inner in walk_nodes(sub)
                     if inner.op_type in ops)
        if nested:
            count(stats, "skipped_in_subgraph", nested)
        layers = []
        for i in index.topological_order():
            node = index.nodes[i]
            if node.op_type not in ops or node.domain not in STANDARD_DOMAINS:
                continue
            layer = self._layer(node, index, store, taught, new_name)
            if isinstance(layer, str):
                count(stats, f"skipped_{layer}")
            elif layer is not None and 0 < self.options.max_layers <= len(layers):
                count(stats, "skipped_max_layers")
            elif layer is not None:
                layers.append(layer)
        return layers

    def _layer(self, node, index: GraphIndex, store: WeightStore, taught: set[str], new_name):
        """The node as a layer, a skip reason, or None when it is no layer (no constant weight)."""
        producer = index.producer_node(node.input[1]) if len(node.input) > 1 else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "quantized_weight"
        use = weight_use(node, store)
        if use is None:
            return None
        if store.tensor(use.weight).data_type not in FLOAT_TYPES:
            return "not_float"
        if any(fnmatch.fnmatchcase(n, p) for p in self.options.exclude for n in (node.name, use.weight)):
            return "excluded"
        if len(index.consumers.get(use.weight, ())) > 1 or index.is_graph_output(use.weight):
            return "shared_weight"
        width = store.tensor(use.weight).dims[use.out_axis]
        target, bias = node.output[0], use.bias
        if node.op_type == "MatMul":
            target, bias = _matmul_bias(node.output[0], index, store, width)
        elif node.op_type == "Gemm" and attribute(node, "beta", 1.0) == 0:
            bias = None
        if bias is not None:
            if bias not in store:
                return "bias_not_constant"
            if len(index.consumers.get(bias, ())) > 1 or index.is_graph_output(bias):
                return "shared_weight"
            if not _per_channel(store, bias, width):
                return "bias_not_per_channel"
        if target not in taught:
            return "missing_in_teacher"
        weight_shape = tuple(store.tensor(use.weight).dims)
        stream = _residual_stream(target, index, store, taught, reshapes=node.op_type != "Conv")
        if node.op_type == "Conv":
            return Layer(store, use, target, bias, LayerGeometry.conv(node, weight_shape), new_name, stream=stream)
        gemm = node.op_type == "Gemm"
        geometry = LayerGeometry.linear(weight_shape[use.in_axis], width, use.data_axis)
        return Layer(store, use, target, bias, geometry, new_name, attribute(node, "alpha", 1.0) if gemm else 1.0,
                     attribute(node, "beta", 1.0) if gemm else 1.0, stream)


def _ahead(layers: Iterable[Layer], per_channel: int) -> list[str]:
    """The teacher values of the next layers to compute in the same piece as this one's (fewer onnxruntime
    sessions): as many as ``PREFETCH_BYTES`` holds, each estimated at ``per_channel`` bytes (the last
    target's) times its width: exact where the rows stay alike (a transformer), above where feature
    maps shrink (a CNN)."""
    names: list[str] = []
    total = 0
    for layer in layers if per_channel else ():
        total += per_channel * layer.width * len(layer.rows.teacher_values)
        if total > PREFETCH_BYTES:
            break
        names += layer.rows.teacher_values
    return names


def _channel_bytes(target: list[np.ndarray], width: int) -> int:
    """Bytes of one output channel of a layer's target over all batches: what :func:`_ahead` sizes by."""
    return sum(np.asarray(v).nbytes for v in target) // width


def _rows(layer: _LayerRows, values: list[np.ndarray], width: int = 0) -> np.ndarray:
    """A linear layer's input rows over every batch, float32, with a ones column when it has a bias
    (``width``: its output rows instead)."""
    rows = np.concatenate([np.reshape(v, (-1, width or layer.geometry.inputs)) for v in values]).astype(
        np.float32, copy=False)
    return np.concatenate([rows, np.ones((len(rows), 1), np.float32)], axis=1) if layer.with_bias and not width else rows


def _output_error(student: dict[str, list[np.ndarray]], teacher: dict[str, list[np.ndarray]]) -> float:
    """The student's output error relative to the teacher's (L2 over every numeric output and batch)."""
    return _relative_error(*_error_sums(student, teacher))


def _relative_error(err: float, ref: float) -> float:
    return float(np.sqrt(err / ref)) if ref else (0.0 if err == 0 else float("inf"))


def _error_sums(student: dict[str, list[np.ndarray]], teacher: dict[str, list[np.ndarray]]) -> tuple[float, float]:
    """``(Σ |student - teacher|², Σ teacher²)`` over every numeric output and batch: mergeable over shards."""
    err = ref = 0.0
    for name, values in teacher.items():
        for s, t in zip(student[name], values):
            try:  # float arrays as they are (BLAS dot, float32 blocks suffice); other numbers as float64
                s, t = ((v.reshape(-1) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else numeric_values(v))
                        for v in (s, t))
            except TypeError:  # string outputs carry no error to reduce
                continue
            diff = s - t
            err += float(np.dot(diff, diff))
            ref += float(np.dot(t, t))
    return err, ref


@dataclass(frozen=True)
class _LayerRows:
    """What a worker needs to sum a layer's statistics: its input and target names and geometry."""

    data: str
    target: str
    stream: tuple[str, str] | None
    geometry: LayerGeometry
    with_bias: bool

    @property
    def teacher_values(self) -> list[str]:
        """What the layer may ask of the teacher: its target, and the residual stream's sum."""
        return [self.target, *self.stream[:1]] if self.stream else [self.target]


@dataclass(frozen=True)
class _AttentionPair:
    """What a worker needs to gather a query / key pair's data: both layers' rows and outputs, the attention."""

    query: _LayerRows
    key: _LayerRows
    query_output: str  # the layers' node outputs: still to run, or the fit comes too late
    key_output: str
    attention: AttentionScores


def _attention_data(student: LayerwiseRunner, taught: dict[str, list[np.ndarray]], rows: dict, pair: _AttentionPair):
    """``(inputs, target scores, probabilities)`` of a pair over the runners' batches (``taught``: the teacher's
    scores and probabilities; ``rows``: the layers' inputs and targets by target, kept as they were fit; taken),
    or why there are none."""
    (xq, yq), (xk, yk) = rows.pop(pair.query.target), rows.pop(pair.key.target)
    if student.ready(pair.query_output) or student.ready(pair.key_output):
        return "skipped_already_run"
    attention = pair.attention
    target, probabilities = (np.concatenate([v.reshape(-1, attention.heads, *v.shape[-2:]) for v in taught[n]],
                                            dtype=np.float32) for n in (attention.scores, attention.probabilities))
    queries = _rows(pair.query, xq)
    same = (pair.key.data, pair.key.with_bias) == (pair.query.data, pair.query.with_bias)  # Q and K read one input
    inputs = (queries, queries if same else _rows(pair.key, xk))
    first = np.size(taught[attention.scores][0]) // (attention.heads * target.shape[-1] * target.shape[-2])
    outputs = (_rows(pair.query, yq[:1], pair.query.geometry.outputs),  # the layout is checked on the first batch
               _rows(pair.key, yk[:1], pair.key.geometry.outputs))
    if (probabilities.shape != target.shape or any(len(x) != target.shape[0] * target.shape[-1] for x in inputs)
            or not layout_matches(attention, *outputs, target[:first])):
        return "layout_mismatch"
    return inputs, target, probabilities


def _inputs_and_targets(student: LayerwiseRunner, teacher: LayerwiseRunner, layer: _LayerRows, stats) -> tuple:
    """The layer's input (student) and target (teacher; with a residual stream, what the layer must add to the
    student's stream to reach the teacher's sum) per batch."""
    x = student.values([layer.data])[layer.data]
    stream = layer.stream is not None and student.ready(layer.stream[1])
    taught = _teacher_values(teacher, layer, stream, ())
    return x, _target(student, layer, taught, stats)


def _teacher_values(teacher: LayerwiseRunner, layer: _LayerRows, stream: bool, ahead: Sequence[str],
                    also: Sequence[str] = ()) -> dict[str, list[np.ndarray]]:
    """What the layer asks of the teacher, in one piece with the ``ahead`` values: its target, the residual
    stream's sum when the student's residual is known (``stream``), and ``also`` (an attention's scores)."""
    taught = teacher.values([*(layer.teacher_values if stream else [layer.target]), *also], ahead)
    teacher.release(layer.teacher_values)  # a stream sum computed ahead but not used
    return taught


def _target(student: LayerwiseRunner, layer: _LayerRows, taught: dict[str, list[np.ndarray]], stats) -> list:
    """The layer's target from the teacher's values: through the residual stream when the teacher's sum
    is there (:func:`_stream_target`)."""
    if layer.stream is None:
        return taught[layer.target]
    total, residual = layer.stream
    if total not in taught:
        count(stats, "stream_residual_not_computed_yet")  # computing it would run later layers early
        return taught[layer.target]
    return _stream_target(taught[layer.target], taught[total], student.values([residual])[residual], stats)


def _teacher_steps(runner: LayerwiseRunner, layers: list[Layer], streams: list[bool], outputs: list[str],
                   also: dict[Layer, list[str]]) -> Iterator[dict[str, list[np.ndarray]]]:
    """The teacher's values for each layer in order, then its outputs. ``also``: what a layer asks beyond its
    own values (the later layer of a query / key pair: the attention's scores and probabilities)."""
    per_channel = 0  # bytes of one output channel of the last target (all batches); 0: none yet
    for position, (layer, stream) in enumerate(zip(layers, streams)):
        rows = layer.rows
        taught = _teacher_values(runner, rows, stream, _ahead(layers[position + 1:], per_channel),
                                 also.get(layer, ()))
        per_channel = _channel_bytes(taught[rows.target], layer.width)
        yield taught
    yield runner.values(outputs)


class _Teacher:
    """:func:`_teacher_steps` computed in a thread ahead of the layers (``threaded``), or each when asked for:
    the teacher never changes, so its pieces overlap the student's pieces, statistics and fits here. The
    same asks, in the same order, as one at a time (the same pieces: the same values); at most ``QUEUED``
    layers' values wait beside the pieces computed ahead."""

    QUEUED = 2

    def __init__(self, steps: Iterator[dict[str, list[np.ndarray]]], threaded: bool) -> None:
        self.steps = steps
        self.thread = None
        if threaded:
            self.queue: queue.Queue = queue.Queue(maxsize=self.QUEUED)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._produce, name="distill-teacher", daemon=True)
            self.thread.start()

    def _produce(self) -> None:
        try:
            for item in self.steps:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again where the values are taken
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue the item; False when closed meanwhile."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> dict[str, list[np.ndarray]]:
        """The next layer's values (after the last layer: the outputs); an error of the thread raised here."""
        if self.thread is None:
            return next(self.steps)
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()


def _teacher_work(layers: Sequence[Layer], batches: Sequence[dict[str, np.ndarray]]) -> float:
    """A lower bound of the multiply-adds of the layers over the calibration data: weights times samples (a
    Conv's output positions and a sequence's tokens multiply it further). Below ``THREADED_TEACHER_WORK``
    a thread costs more than it overlaps: digits_mlp's teacher and unchanged student (17 k weights, 128
    samples) ran 0.7 ms slower at best and 1.7 ms in the median in threads (thread start-up and GIL
    hand-offs: a thread waiting for the GIL waits up to the 5 ms switch interval), of a 9.7 ms distill."""
    samples = sum(len(np.atleast_1d(next(iter(feed.values())))) for feed in batches)
    return float(sum(layer.geometry.inputs * layer.geometry.outputs * layer.geometry.groups for layer in layers)
                 * samples)


class _Runs:
    """Student and teacher run piece by piece in this process. The student's outputs before any change (for the
    keep-the-better check) are computed in a thread beside the layers, and so are the teacher's values
    (:class:`_Teacher`), an attention's scores and probabilities with the later layer of its pair; for
    layers of less than ``THREADED_TEACHER_WORK`` (:func:`_teacher_work`), both in this thread when needed."""

    def __init__(self, model, teacher, feeds, batch_size: int, layers: list[Layer]) -> None:
        self.outputs = [o.name for o in model.graph.output]
        self.student = LayerwiseRunner(model, feeds, batch_size)
        self.layers = layers
        self.keep_rows: set[str] = set()  # layers (targets) whose inputs and targets a later fit needs (attention)
        self.rows: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self.also: dict[Layer, list[str]] = {}  # the teacher's values a layer asks beyond its own (attention)
        self.scores: dict[str, list[np.ndarray]] = {}  # those of the last such layer, until its attention is fit
        self.threaded = _teacher_work(layers, self.student.batches) >= THREADED_TEACHER_WORK
        before = LayerwiseRunner(model, feeds, batch_size).later(self.outputs)
        self.before_pool = ThreadPoolExecutor(1, thread_name_prefix="distill-before") if self.threaded else None
        self.before = self.before_pool.submit(before).result if self.threaded else before
        self.runner = LayerwiseRunner(teacher, feeds, batch_size)  # the teacher's
        self.teacher: _Teacher | None = None  # its thread, started by the first layer

    def taught(self) -> _Teacher:
        """The teacher's thread, started before the student has run anything (what each layer will ask of
        the teacher is planned from that state)."""
        if self.teacher is None:
            rows = [layer.rows for layer in self.layers]
            streams = self.student.plan([r.data for r in rows], [r.stream[1] if r.stream else None for r in rows])
            self.teacher = _Teacher(_teacher_steps(self.runner, self.layers, streams, self.outputs, self.also),
                                    self.threaded)
        return self.teacher

    def statistics(self, layer: Layer, gram: np.ndarray | None, stats) -> tuple[LayerStatistics | None, float]:
        """The layer's statistics (None: the target does not fit it) and their work (for BLAS threads)."""
        x = self.student.values([layer.use.data])[layer.use.data]
        taught = self.taught().next()
        y = _target(self.student, layer.rows, taught, stats)
        if layer in self.also:
            self.scores = {name: taught[name] for name in self.also[layer]}
        if layer.target in self.keep_rows:
            self.rows[layer.target] = (x, y)
        work = layer.geometry.work(x)
        with blas_threads(work):
            return layer.statistics(x, y, gram), work

    def hold_teacher(self, also: dict[Layer, list[str]]) -> None:
        """What layers will ask of the teacher beyond their own values (before the first layer's)."""
        self.runner.hold(n for names in also.values() for n in names)
        self.also.update(also)

    def attention(self, pair: _AttentionPair) -> tuple[Callable | str, float]:
        """``(key, other weights) -> ScoreProblem`` for the pair (or why not), and the work of one step."""
        data = _attention_data(self.student, self.scores, self.rows, pair)
        self.scores = {}
        if isinstance(data, str):
            return data, 0.0
        inputs = data[0]
        return local_scores(pair.attention, *data), 2.0 * sum(rows.size for rows in inputs) * pair.query.geometry.outputs

    def changed(self, node: onnx.NodeProto, constants: list[str]) -> None:
        """The student runs the model in place: nothing to send."""

    def output_errors(self, outputs: list[str]) -> tuple[float, float]:
        """The output error against the teacher before and after the layers' changes."""
        reference = self.taught().next()
        return (_output_error(self.before(), reference),
                _output_error(self.student.values(outputs), reference))

    def pieces(self) -> int:
        return self.student.sessions

    def close(self) -> None:
        if self.teacher is not None:
            self.teacher.close()
        if self.before_pool is not None:
            self.before_pool.shutdown(cancel_futures=True)


class _ShardedRuns:
    """The same on an executor's workers (:class:`ShardedRunner`): each calibration shard's student and teacher
    runners on one worker; per layer, statistics per shard merged in shard order, and the exact error of the
    current weights (near a match) summed there too."""

    def __init__(self, executor, model, teacher, feeds: FeedSet, batch_size: int) -> None:
        self.runner = ShardedRunner(executor, model, feeds, batch_size, teacher=teacher)
        self.runner.map(_keep_outputs_before, [o.name for o in model.graph.output])
        self.keep_rows: set[str] = set()

    def hold_teacher(self, also: dict[Layer, list[str]]) -> None:
        names = [n for names in also.values() for n in names]
        if names:
            self.runner.map(_hold_teacher, names)

    def attention(self, pair: _AttentionPair) -> tuple[Callable | str, float]:
        """The pair's score problems summed over the shards (each shard's part where its rows are), or why not."""
        reasons = [r for r in self.runner.map(_shard_attention_data, pair) if r is not None]
        if reasons:
            return reasons[0], 0.0
        return functools.partial(_ShardedScores, self.runner), 0.0

    def statistics(self, layer: Layer, gram: np.ndarray | None, stats) -> tuple[LayerStatistics | None, float]:
        partials = self.runner.map(_shard_statistics, layer.rows, gram is None, layer.target in self.keep_rows)
        for key, n in partials[0][1].items():  # counted once per layer, as in this process
            count(stats, key, n)
        if any(sums is None for sums, _ in partials):
            return None, 0.0
        sums = functools.reduce(LayerStatistics.merge, (p for p, _ in partials))
        if gram is not None:
            sums.gram = gram
        sums.anchor(layer.current()[1], NEAR,
                    lambda start: sum(self.runner.map(_shard_start_error, layer.geometry, start)))
        return sums, float(sums.rows) * layer.geometry.inputs ** 2 * layer.geometry.groups

    def changed(self, node: onnx.NodeProto, constants: list[str]) -> None:
        self.runner.changed(node, constants)

    def output_errors(self, outputs: list[str]) -> tuple[float, float]:
        sums = self.runner.map(_shard_output_errors, outputs)
        before, after, ref = (sum(s[i] for s in sums) for i in range(3))
        return _relative_error(before, ref), _relative_error(after, ref)

    def pieces(self) -> int:
        return self.runner.map(_shard_pieces)[0]

    def close(self) -> None:
        self.runner.close()


def _keep_outputs_before(runners: ShardRunners, outputs: list[str]) -> None:
    """Before any change: the student's outputs on the shard, for the output error at the end."""
    runners.kept["before"] = LayerwiseRunner(runners.model.model, runners.model.batches, 1).values(outputs)


def _shard_statistics(runners: ShardRunners, layer: _LayerRows, gram: bool, keep: bool = False):
    """One shard's statistics of a layer (without the gram when another layer's is reused), and the counts
    (``keep``: its rows are kept for the attention fit)."""
    counts: dict = {}
    x, y = _inputs_and_targets(runners.model, runners.teacher, layer, counts)
    if keep:
        runners.kept.setdefault("attention_rows", {})[layer.target] = (x, y)
    sums = LayerStatistics.empty(layer.geometry, bias=layer.with_bias, target=True)
    fitted = sums.update_batches(layer.geometry, x, y, gram=gram)
    runners.kept["rows"] = (x, y) if fitted else None  # for the exact error of the current weights
    return (sums if fitted else None), counts


def _hold_teacher(runners: ShardRunners, names: list[str]) -> None:
    runners.teacher.hold(names)


def _shard_attention_data(runners: ShardRunners, pair: _AttentionPair) -> str | None:
    """Gather a shard's rows, scores and probabilities for the pair's fit (None), or say why not."""
    attention = pair.attention
    data = _attention_data(runners.model, runners.teacher.values([attention.scores, attention.probabilities]),
                           runners.kept.setdefault("attention_rows", {}), pair)
    if isinstance(data, str):
        return data
    runners.kept["attention"] = local_scores(pair.attention, *data)
    return None


def _shard_score_problem(runners: ShardRunners, key: bool, other: np.ndarray) -> None:
    runners.kept["scores"] = runners.held("attention")(key, other)


def _shard_scores(runners: ShardRunners, method: str, *args):
    return getattr(runners.held("scores"), method)(*args)


class _ShardedScores:
    """One side's score problem as sums over the calibration shards, in shard order (:class:`Scores`)."""

    def __init__(self, runner: ShardedRunner, key: bool, other: np.ndarray) -> None:
        self.runner = runner
        runner.map(_shard_score_problem, key, other)

    def product(self, direction: np.ndarray) -> np.ndarray:
        return functools.reduce(np.add, self.runner.map(_shard_scores, "product", direction))

    def residual(self, weights: np.ndarray) -> tuple[np.ndarray, float]:
        parts = self.runner.map(_shard_scores, "residual", weights)
        return functools.reduce(np.add, (p[0] for p in parts)), sum(p[1] for p in parts)

    def error(self, weights: np.ndarray) -> float:
        return sum(self.runner.map(_shard_scores, "error", weights))

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = self.runner.map(_shard_scores, "factors")
        return tuple(functools.reduce(np.add, (p[i] for p in parts)) for i in range(2))


def _shard_start_error(runners: ShardRunners, geometry: LayerGeometry, start: np.ndarray) -> float:
    x, y = runners.held("rows")
    return LayerStatistics.empty(geometry, bias=start.shape[1] > geometry.inputs).start_error(geometry, x, y, start)


def _shard_output_errors(runners: ShardRunners, outputs: list[str]) -> tuple[float, float, float]:
    reference = runners.teacher.values(outputs)
    before, ref = _error_sums(runners.held("before", pop=True), reference)
    after, _ = _error_sums(runners.model.values(outputs), reference)
    return before, after, ref


def _shard_pieces(runners: ShardRunners) -> int:
    return runners.model.sessions


RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # keep the element order: rows stay rows


def _residual_stream(output: str, index: GraphIndex, store: WeightStore, taught: set[str], reshapes: bool
                     ) -> tuple[str, str] | None:
    """``(sum, residual)`` when the layer's output, through order-keeping reshapes (MatMul / Gemm only),
    is the sole reader-chain into an ``Add`` with a computed value (a residual stream); else None."""
    value = output
    while True:
        readers = index.consumer_nodes(value)
        if len(readers) != 1 or index.is_graph_output(value) or readers[0].domain not in STANDARD_DOMAINS:
            return None
        reader = readers[0]
        if reader.op_type in RESHAPES and reshapes and reader.input[0] == value:
            value = reader.output[0]
            continue
        other = [n for n in reader.input if n != value]
        if reader.op_type != "Add" or len(other) != 1 or other[0] in store or not other[0] \
                or reader.output[0] not in taught:
            return None
        return reader.output[0], other[0]


def _stream_target(target: list[np.ndarray], total: list[np.ndarray], residual: list[np.ndarray], stats) -> list:
    """What the layer must add to the student's residual stream to reach the teacher's sum: the teacher's
    ``layer + residual`` minus the student's residual, so the layer also repairs the drift upstream of it.
    The plain target where shapes do not line up (a broadcast residual)."""
    if not all(np.shape(t) == np.shape(r) and np.size(t) == np.size(y) for y, t, r in zip(target, total, residual)):
        count(stats, "stream_target_shape_mismatch")
        return target
    count(stats, "stream_targets")
    return [(t - r).reshape(np.shape(y)) for y, t, r in zip(target, total, residual)]


def _remove_initializer(store: WeightStore, name: str) -> None:
    """Delete an initializer the store added, and rebuild the store in place (every layer shares it)
    so that it no longer names the tensor."""
    graph = store.graph
    position = next(i for i in range(len(graph.initializer) - 1, -1, -1) if graph.initializer[i].name == name)
    del graph.initializer[position]
    store.__init__(graph)


def _per_channel(store: WeightStore, name: str, width: int) -> bool:
    dims = store.tensor(name).dims
    return len(dims) > 0 and dims[-1] == width and int(np.prod(dims)) == width


def _matmul_bias(output: str, index: GraphIndex, store: WeightStore, width: int) -> tuple[str, str | None]:
    """(target, bias): a following Add of a constant per-channel bias, when it is the MatMul's only
    reader and reads that bias alone; else the MatMul output without a bias."""
    readers = index.consumer_nodes(output)
    if len(readers) == 1 and not index.is_graph_output(output):
        add = readers[0]
        other = [n for n in add.input if n != output]
        if (add.op_type == "Add" and add.domain in STANDARD_DOMAINS and len(other) == 1 and other[0] in store
                and len(index.consumers.get(other[0], ())) == 1 and _per_channel(store, other[0], width)):
            return add.output[0], other[0]
    return output, None
