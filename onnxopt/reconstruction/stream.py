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

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..data import FeedSet
from ..errors import InputError
from ..graph import GraphIndex, node_uses
from ..validate import Session, batched, dynamic_batch
from .statistics import LayerGeometry, LayerStatistics

JOINED = 16  # samples per run when the model's batch axis is dynamic


class LayerwiseRunner:
    """Lazily computes named values of ``model`` for every calibration batch; nodes run at most once.

    The model may change between asks (weights of nodes not run yet); nodes already run are not
    run again. ``batch_size`` samples a run (0: ``JOINED`` when every input's batch axis is dynamic).
    """

    def __init__(self, model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], batch_size: int = 0) -> None:
        self.model = model
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

    def values(self, names: Sequence[str], ahead: Sequence[str] = ()) -> dict[str, list[np.ndarray]]:
        """Each name's value per batch, running the nodes it still needs.

        ``ahead``: values computed in the same piece and held until asked for or released: fewer,
        larger pieces where the model does not change between asks (a teacher)."""
        ahead = [n for n in ahead if n not in names and self.index.producer.get(n, -1) in self.pending]
        self._run(self._ancestors([*names, *ahead]), [*names, *ahead])
        self.held.update(ahead)
        self.held.difference_update(names)
        return {name: self._value(name) for name in names}

    def release(self, names: Iterable[str]) -> None:
        """Values held ahead that will not be asked for after all."""
        for name in names:
            if name in self.held:
                self.held.discard(name)
                if not self.readers[name] and name not in self.outputs:
                    self.frontier.pop(name, None)

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

    def _ancestors(self, names: Sequence[str]) -> list[int]:
        """Pending nodes the names need, in topological order."""
        needed, todo = set(), [self.index.producer[n] for n in names if n in self.index.producer]
        while todo:
            i = todo.pop()
            if i in needed or i not in self.pending:
                continue
            needed.add(i)
            todo.extend(self.index.producer[n] for n in self.index.uses[i] if n in self.index.producer)
        return sorted(needed, key=self.position.__getitem__)

    def _run(self, piece: list[int], asked: Sequence[str]) -> None:
        if not piece:
            return
        self.pending.difference_update(piece)
        self.readers.subtract(n for i in piece for n in self.index.uses[i])
        produced = {o for i in piece for o in self.index.nodes[i].output if o}
        # uses read afresh: a layer may have gained an input (a new bias) since the index was built
        read = list(dict.fromkeys(n for i in piece for n in node_uses(self.index.nodes[i]) if n not in produced))
        kept = [n for n in dict.fromkeys([*asked, *sorted(produced)])
                if n in produced and (self.readers[n] > 0 or n in asked or n in self.outputs)]
        inputs = [n for n in read if self._initializer(n) is None]
        graph = onnx.helper.make_graph(
            [self.index.nodes[i] for i in piece], "piece",
            [_value_info(n, self._value(n)[0]) for n in inputs], [onnx.ValueInfoProto(name=n) for n in kept],
            initializer=[self._initializer(n) for n in read if self._initializer(n) is not None])
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        sub.functions.extend(self.model.functions)
        columns = {n: self._value(n) for n in inputs}
        results: dict[str, list[np.ndarray]] = {n: [] for n in kept}
        with Session(sub, optimize=True) as session:
            self.sessions += 1
            for b in range(len(self.batches)):
                out = session.run({n: columns[n][b] for n in inputs}, kept)
                for n in kept:
                    results[n].append(out[n])
        self.frontier.update(results)
        for name in [n for n in self.frontier if self.readers[n] <= 0 and n not in self.outputs]:
            if name not in asked and name not in self.held:
                del self.frontier[name]


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    array = np.asarray(array)
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                              [None] * array.ndim)


def input_statistics(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]],
                     layers: Mapping[str, LayerGeometry], batch_size: int = 0) -> dict[str, LayerStatistics]:
    """``[X, 1]ᵀ[X, 1]`` of each named layer input (with its geometry) over the calibration data, in one pass
    (the ones column gives input sums: :meth:`LayerStatistics.centered` needs them).

    For solvers that work on the original model's inputs (learned rounding); layers that must see
    their predecessors' changes use :class:`LayerwiseRunner` instead.
    """
    size = batch_size or (JOINED if isinstance(feeds, FeedSet) and dynamic_batch(model) else 1)
    sums = {name: LayerStatistics.empty(geometry, bias=True) for name, geometry in layers.items()}
    inputs = {i.name for i in model.graph.input}
    fetched = [n for n in layers if n not in inputs]
    with Session(model, extra_outputs=fetched, optimize=True) as session:
        for _, feed in batched(feeds, size):
            values = session.run(feed, fetched) if fetched else {}
            for name, geometry in layers.items():
                sums[name].update(geometry, values[name] if name in values else feed[name])
    return sums
