"""zero-rows: remove output neurons / channels that carry an input-independent value, exactly.

The channel dependency analysis (:mod:`.channels`) says which channels may go: those whose every
use is understood (MLP hidden units, conv channels, attention heads) and that are constant where a
consumer contracts them. Removing one slices the sources, every per-channel parameter, the
consumers' input axes (folding its constant into their bias) and the Reshape targets that spell
out its width or head count; no other channel changes, so outputs stay the same. Why dead channels
stay is counted per reason as ``kept_dead_<reason>`` (channel groups; a group may have several).
An attention head counts as one channel in ``channels_removed``, and in ``heads_removed``.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import filter_field, opset_version, unique_name_factory, value_shapes, walk_graphs
from .base import Pass, PassResult
from .channels import ChannelGraph, Producer, has_producers
from .weights import BiasAdder, WeightUse, attribute, from_canonical, to_canonical


class ZeroRows(Pass):
    name = "zero-rows"
    summary = "remove neurons/channels whose weight rows are zero, folding their constant into consumers"
    exact = True

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"channels_removed": 0, "parameters_removed": 0}
        if not has_producers(model):
            return PassResult(model, False, stats)
        shapes = value_shapes(model)
        new_name = unique_name_factory(model)
        opset = opset_version(model)
        for graph in walk_graphs(model.graph):
            analysis = ChannelGraph(graph, opset, shapes if graph is model.graph else {})
            for reason, n in sorted(analysis.skips.items()):
                stats[f"skipped_{reason}"] = stats.get(f"skipped_{reason}", 0) + n
            for reason, n in sorted(analysis.kept.items()):
                stats[f"kept_dead_{reason}"] = stats.get(f"kept_dead_{reason}", 0) + n
            removed = analysis.removable()
            if removed.any():
                removal = ChannelRemoval(analysis, removed, new_name)
                removal.apply()
                stats["channels_removed"] += int(removed.sum())
                if heads := analysis.head_count(removed):
                    stats["heads_removed"] = stats.get("heads_removed", 0) + heads
                stats["parameters_removed"] += removal.parameters_removed
        return PassResult(model, stats["channels_removed"] > 0, stats)


class ChannelRemoval:
    """Slice every tensor a removed channel touches and fold constant channels into consumer biases.

    ``parameters_removed`` counts the tensor elements the rewrite takes out of the graph, net of
    those it adds (new initializers for shared constants, folded biases).
    """

    def __init__(self, analysis: ChannelGraph, removed: np.ndarray, new_name) -> None:
        self.analysis = analysis
        self.store = analysis.store
        self.new_name = new_name
        self.keep = {name: analysis.keep_mask(name, removed) for name in analysis.values}
        self.bias = BiasAdder(analysis.index, analysis.store, new_name, analysis.constant)
        self.resized: set[str] = set()  # constants rewritten in place (their value_info goes stale)
        self.sliced = 0  # elements removed by _write (net of new initializers)
        self.copies: dict[tuple, str] = {}  # new initializers for shared constants, by name and value

    @property
    def parameters_removed(self) -> int:
        return self.sliced - self.bias.added

    def apply(self) -> None:
        keep = self.keep
        for producer in self.analysis.producers:
            mask = keep[producer.output]
            if not mask.all():
                self._slice_producer(producer, mask)
        for node, use in self.analysis.exits:
            mask = keep[use.data]
            if not mask.all():
                self._slice_consumer(node, use, mask)
        for node, position, channel_value, axis in self.analysis.sliced_constants:
            mask = keep[channel_value]
            if not mask.all():
                self._write(node, position, np.compress(mask, self.analysis.constant(node.input[position]), axis))
        for node, channel_value, entry, multiplier, divisor in self.analysis.reshapes:
            mask = keep[channel_value]
            if not mask.all():
                target = self.analysis.constant(node.input[1]).copy()
                target[entry] = int(mask.sum()) * multiplier // divisor
                self._write(node, 1, target)
        self.bias.finish()
        graph = self.analysis.graph
        changed = {name for name, mask in keep.items() if not mask.all()} | self.resized
        filter_field(graph.value_info, lambda v: v.name not in changed)

    def _write(self, node: onnx.NodeProto, position: int, array: np.ndarray) -> None:
        """New values for a node's constant input: in place when only it reads them, else a new initializer."""
        name = node.input[position] if position < len(node.input) else ""
        if name in self.store and self.analysis.readers(name) == 1:
            self.sliced += int(np.prod(self.store.tensor(name).dims, dtype=np.int64)) - array.size
            self.store.set_array(name, array)
            self.resized.add(name)
            return
        key = (name, array.dtype.str, array.shape, array.tobytes())
        fresh = self.copies.get(key)
        if fresh is None:  # one copy per new value of a shared constant (a head-split target read by Q, K, V)
            fresh = self.copies[key] = self.new_name(f"{name or node.name or node.op_type}_zero_rows")
            self.store.add_initializer(fresh, array)
            self.sliced -= array.size
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = fresh

    def _slice_producer(self, producer: Producer, mask: np.ndarray) -> None:
        node, use = producer.node, producer.use
        self._write(node, 1, np.compress(mask, self.store.array(use.weight), axis=use.out_axis))
        bias = _input_constant(self.analysis, node, 2)
        if bias is not None and bias.ndim and bias.shape[-1] == mask.size and mask.size > 1:
            self._write(node, 2, np.compress(mask, bias, axis=-1))
        if producer.depthwise:
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = int(mask.sum())

    def _slice_consumer(self, node: onnx.NodeProto, use: WeightUse, mask: np.ndarray) -> None:
        """Drop input channels; in a grouped Conv each output reads only its group's inputs."""
        weight = self.store.array(use.weight)
        canonical = to_canonical(weight, use)  # (out, ..., in per group)
        groups = use.groups
        blocks = canonical.reshape(groups, canonical.shape[0] // groups, -1, canonical.shape[-1])
        keep = mask.reshape(groups, -1)
        constants = np.where(keep, 0.0, self.analysis.values[use.data].value.reshape(groups, -1))
        if constants.any():
            delta = np.einsum("gmc,gc->gm", blocks.astype(np.float64).sum(axis=2), constants).ravel()
            if node.op_type == "Gemm":
                delta = delta * attribute(node, "alpha", 1.0)
            self.bias.add(node, delta.astype(weight.dtype))
        kept = np.argsort(~keep, axis=1, kind="stable")[:, : keep[0].sum()]  # kept positions, in order
        sliced = np.take_along_axis(blocks, kept[:, None, None, :], axis=-1)
        self._write(node, 1, from_canonical(sliced.reshape(*canonical.shape[:-1], kept.shape[1]), use))


def _input_constant(analysis: ChannelGraph, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    """A node's constant input as it is now (a rewrite may have pointed it at a new initializer)."""
    name = node.input[position] if position < len(node.input) else ""
    return analysis.constant(name) if name else None

