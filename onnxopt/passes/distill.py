"""distill: repair the optimized model (the student) against the original (the teacher) on real data.

Knowledge distillation in the form a graph tool can do it. Layer by layer, in topological order,
each MatMul / Gemm is refit by ridge least squares so that, fed the student's own input (earlier
layers already repaired), it reproduces the teacher's value of the same name after the bias;
each Conv gets bias correction (the teacher's per-channel means). One paired stream of the
calibration data per layer accumulates only mergeable float64 sums (normal equations, channel
sums), so memory does not grow with the number of samples.

The ridge pulls toward the current weights, not toward zero: with fewer calibration rows than
inputs, the directions the data does not see keep the student's values instead of collapsing.
Zeros from pruning stay zero (each output column is solved over its nonzero inputs; an all-zero
column, a pruned neuron, is left alone). A layer's change is kept only if the model's output
error against the teacher on the calibration data goes down; otherwise it is undone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from ..tensors import FLOAT_TYPES
from ..graph import (STANDARD_DOMAINS, GraphIndex, WeightStore, defined_names, node_subgraphs,
                     unique_name_factory, walk_nodes)
from ..validate import Session, batched, numeric_values
from .base import Pass, PassResult, count
from .weights import WeightUse, attribute, from_canonical, to_canonical, weight_use

LAYER_OPS = ("MatMul", "Gemm", "Conv")
MATCHED = 1e-5  # relative error below which a layer already reproduces its target (float32 rounding)


@dataclass
class NormalEquations:
    """``G = sum A^T A``, ``C = sum A^T Y`` and ``sum Y^2`` over every row ``A = [X, 1]`` (``[X]`` without a bias).

    Rows are all leading axes of the layer input flattened. Sums merge across shards and batches.
    """

    gram: np.ndarray
    cross: np.ndarray
    data_axis: int
    bias: bool
    target_sq: float = 0.0

    @classmethod
    def empty(cls, inputs: int, outputs: int, data_axis: int, bias: bool) -> NormalEquations:
        size = inputs + bias
        return cls(np.zeros((size, size)), np.zeros((size, outputs)), data_axis, bias)

    def update(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Fold one batch in; False when the teacher's value does not have the layer's rows and width."""
        rows = np.moveaxis(x, self.data_axis, -1).reshape(-1, len(self.gram) - self.bias)
        if y.ndim == 0 or y.shape[-1] != self.cross.shape[1] or y.size != len(rows) * y.shape[-1]:
            return False
        a = np.hstack([rows, np.ones((len(rows), 1))]) if self.bias else rows.astype(np.float64)
        self.gram += a.T @ a
        y = y.reshape(len(rows), -1).astype(np.float64)
        self.cross += a.T @ y
        self.target_sq += float(np.vdot(y, y))
        return True

    def merge(self, other: NormalEquations) -> NormalEquations:
        """The sums over both shards' rows: what makes a fit independent of how the calibration data is
        batched or sharded (streaming invariance; tests pin it so any future shard-parallel streaming
        can rely on it)."""
        return NormalEquations(self.gram + other.gram, self.cross + other.cross, self.data_axis, self.bias,
                               self.target_sq + other.target_sq)

    def residual(self, w: np.ndarray) -> float:
        """``|A W - Y|^2`` from the sums alone."""
        return float(np.sum(w * (self.gram @ w)) - 2 * np.sum(w * self.cross) + self.target_sq)

    def solve(self, start: np.ndarray, keep: np.ndarray | None, damping: float) -> np.ndarray:
        """Weights (rows as in ``A``) minimising ``|A W - Y|^2 + lam |W - start|^2``, lam = damping x mean diag G.

        With ``keep``, entries outside it stay as in ``start`` and each column is solved over its
        kept rows only; columns with the same mask share one factorisation.
        """
        lam = damping * (float(np.mean(np.diag(self.gram))) or 1.0)
        gram = self.gram + lam * np.eye(len(self.gram))
        rhs = self.cross + lam * start
        if keep is None:
            return np.linalg.solve(gram, rhs)
        solved = start.copy()
        masks, inverse = np.unique(keep.T, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        for mask, columns in zip(masks, groups):
            rows = np.flatnonzero(mask)
            if rows.size:
                solved[np.ix_(rows, columns)] = np.linalg.solve(gram[np.ix_(rows, rows)], rhs[np.ix_(rows, columns)])
        return solved


@dataclass
class ChannelMeans:
    """Per-channel float64 sums of the student's and the teacher's Conv output (channels on axis 1)."""

    student: np.ndarray | float = 0.0
    teacher: np.ndarray | float = 0.0
    count: int = 0

    def update(self, s: np.ndarray, t: np.ndarray) -> bool:
        if s.shape != t.shape:
            return False
        axes = (0, *range(2, s.ndim))
        self.student = self.student + s.sum(axis=axes, dtype=np.float64)
        self.teacher = self.teacher + t.sum(axis=axes, dtype=np.float64)
        self.count += s.size // s.shape[1]
        return True

    @property
    def shift(self) -> np.ndarray:
        """What the student's channel means lack: teacher mean - student mean."""
        return (self.teacher - self.student) / self.count

    def matched(self) -> bool:
        return bool(np.all(np.abs(self.shift) <= MATCHED * np.abs(self.teacher / self.count).max(initial=0.0)))


@dataclass(eq=False)
class LinearLayer:
    """A MatMul / Gemm whose output after its bias must match the teacher's ``target``."""

    store: WeightStore
    use: WeightUse
    target: str
    bias: str | None
    alpha: float = 1.0  # Gemm: y = alpha * x W + beta * bias
    beta: float = 1.0
    stat = "layers_refit"

    @property
    def fetched(self) -> str:
        return self.use.data

    def sums(self) -> NormalEquations:
        dims = self.store.tensor(self.use.weight).dims
        return NormalEquations.empty(dims[self.use.in_axis], dims[self.use.out_axis], self.use.data_axis,
                                     self.bias is not None)

    def current(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The stored arrays, and the effective weights as rows of ``A`` (``(in [+1], out)``)."""
        old = {n: self.store.array(n) for n in (self.use.weight, self.bias) if n}
        start = to_canonical(old[self.use.weight], self.use).T.astype(np.float64) * self.alpha
        if self.bias:
            start = np.vstack([start, old[self.bias].astype(np.float64).reshape(1, -1) * self.beta])
        return old, start

    def matched(self, sums: NormalEquations) -> bool:
        return sums.residual(self.current()[1]) <= MATCHED**2 * sums.target_sq

    def apply(self, sums: NormalEquations, options) -> Callable[[], None]:
        """Write the refit weights (and bias); return what undoes it."""
        old, start = self.current()
        weight = old[self.use.weight]
        keep = None
        if options.keep_zeros:
            keep = start != 0
            if self.bias:
                keep[-1] = keep[:-1].any(axis=0)  # a pruned neuron keeps its bias too
        solved = sums.solve(start, keep, options.damping)
        inputs = weight.shape[self.use.in_axis]
        self.store.set_array(self.use.weight, from_canonical((solved[:inputs] / self.alpha).T, self.use)
                             .astype(weight.dtype))
        if self.bias:
            self.store.set_array(self.bias, (solved[inputs] / self.beta).reshape(old[self.bias].shape)
                                 .astype(old[self.bias].dtype))

        def undo() -> None:
            for name, array in old.items():
                self.store.set_array(name, array)

        return undo


@dataclass(eq=False)
class ConvLayer:
    """A Conv whose output's per-channel means must match the teacher's (bias correction)."""

    store: WeightStore
    use: WeightUse
    target: str
    bias: str | None
    new_name: Callable[[str], str]
    stat = "biases_corrected"

    @property
    def fetched(self) -> str:
        return self.target

    def sums(self) -> ChannelMeans:
        return ChannelMeans()

    def matched(self, sums: ChannelMeans) -> bool:
        return sums.matched()

    def apply(self, sums: ChannelMeans, options) -> Callable[[], None]:
        """Add the mean difference to the bias (a Conv without one gets one); return what undoes it.

        With ``keep_zeros``, channels whose weights are all zero (pruned) are left alone, so
        zero-rows can still remove them.
        """
        node = self.use.node
        delta = sums.shift
        if options.keep_zeros:
            weight = self.store.array(self.use.weight)
            delta = np.where(weight.reshape(len(weight), -1).any(axis=1), delta, 0.0)
        if self.bias:
            old = self.store.array(self.bias)
            self.store.set_array(self.bias, (old + delta).astype(old.dtype))
            return lambda: self.store.set_array(self.bias, old)
        inputs = list(node.input)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.store.tensor(self.use.weight).data_type)
        name = self.new_name(f"{node.name or self.target}_bias")
        self.store.add_initializer(name, delta.astype(dtype))
        del node.input[2:]
        node.input.append(name)

        def undo() -> None:
            del node.input[:]
            node.input.extend(inputs)
            _remove_initializer(self.store, name)

        return undo


class Distill(Pass):
    name = "distill"
    summary = "refit MatMul/Gemm weights (zeros kept) and Conv biases to match the original model on calibration data"
    exact = False

    @dataclass(frozen=True)
    class Options:
        damping: float = 0.1
        keep_zeros: bool = True
        op_types: tuple[str, ...] = LAYER_OPS
        exclude: tuple[str, ...] = ()
        max_layers: int = 0
        batch_size: int = 1

        def __post_init__(self) -> None:
            if not self.damping > 0:
                raise InputError(f"distill: damping must be > 0 (relative to the mean input energy), not {self.damping}")
            unknown = [op for op in self.op_types if op not in LAYER_OPS]
            if unknown or not self.op_types:
                raise InputError(f"distill: op_types must be some of {'|'.join(LAYER_OPS)}, not "
                                 f"'{'|'.join(self.op_types)}'")
            if self.max_layers < 0:
                raise InputError(f"distill: max_layers must be >= 0 (0 = all), not {self.max_layers}")
            if self.batch_size < 1:
                raise InputError(f"distill: batch_size must be >= 1, not {self.batch_size}")

    def requires(self, model: onnx.ModelProto) -> None:
        self.context.calibration_feeds(self.name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        teacher = self.context.teacher_model(self.name)
        stats: dict[str, int | float] = {"layers_refit": 0, "biases_corrected": 0, "layers_reverted": 0}
        layers = self._layers(model, teacher, stats)
        with Session(teacher, extra_outputs=[layer.target for layer in layers]) as teacher_session:
            sums, error = self._stream(model, teacher_session, layers[0] if layers else None)
            stats["calib_rel_err_before"] = error
            for layer, following in zip(layers, [*layers[1:], None]):
                if error == 0:
                    break
                if sums is None or layer.matched(sums):  # nothing to fit, or nothing to gain
                    count(stats, "skipped_width_mismatch" if sums is None else "layers_matched")
                    sums, error = self._stream(model, teacher_session, following)
                    continue
                undo = layer.apply(sums, self.options)
                after_sums, after = self._stream(model, teacher_session, following)
                if after < error:
                    count(stats, layer.stat)
                    sums, error = after_sums, after
                else:
                    undo()
                    count(stats, "layers_reverted")
                    sums = self._stream(model, teacher_session, following)[0] if following else None
        stats["calib_rel_err_after"] = error
        return PassResult(model, stats["layers_refit"] + stats["biases_corrected"] > 0, stats)

    def _stream(self, student: onnx.ModelProto, teacher: Session, layer) -> tuple[object | None, float]:
        """One paired pass of the calibration data through student and teacher.

        Returns the layer's sums (None when the teacher's value has another shape, or no layer)
        and the student's output error relative to the teacher's (L2 over all outputs).
        """
        outputs = [o.name for o in student.graph.output]
        sums = layer.sums() if layer else None
        fetched = [layer.fetched] if layer and layer.fetched not in {i.name for i in student.graph.input} else []
        err = ref = 0.0
        with Session(student, extra_outputs=fetched) as session:
            for _, feed in batched(self.context.calibration_feeds(self.name), self.options.batch_size):
                s = session.run(feed, outputs + fetched)
                t = teacher.run(feed, outputs + ([layer.target] if layer else []))
                for name in outputs:
                    try:
                        student_values, teacher_values = numeric_values(s[name]), numeric_values(t[name])
                    except TypeError:  # string outputs carry no error to reduce
                        continue
                    diff = student_values - teacher_values
                    err += float(np.vdot(diff, diff))
                    ref += float(np.vdot(teacher_values, teacher_values))
                if sums is not None and not sums.update(s.get(layer.fetched, feed.get(layer.fetched)),
                                                        t[layer.target]):
                    sums = None
        return sums, (float(np.sqrt(err / ref)) if ref else (0.0 if err == 0 else float("inf")))

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
        if node.op_type == "Conv":
            return ConvLayer(store, use, target, bias, new_name)
        gemm = node.op_type == "Gemm"
        return LinearLayer(store, use, target, bias, attribute(node, "alpha", 1.0) if gemm else 1.0,
                           attribute(node, "beta", 1.0) if gemm else 1.0)


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
