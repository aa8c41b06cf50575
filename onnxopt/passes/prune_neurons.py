"""prune-neurons: zero whole output neurons / channels so that zero-rows can remove them (lossy).

Channels are taken from zero-rows' own dependency analysis run as if every producer row were
already zero: only channels it would then remove are candidates, so every neuron zeroed here
really goes away in ``zero-rows``. A channel shared by several producers (a residual group, a
depthwise chain) is one neuron: its importance sums over all its producer rows, and all of them
(weights and bias) are zeroed together. In each group of connected channels the ``ratio`` least
important are zeroed, always leaving one. With ``round_to=N`` the number zeroed is the nearest
(fewer on a tie, never more than N - 1 above the ratio) that leaves a multiple of N channels:
onnxruntime's Conv kernels can run slower on a channel count off a multiple of 8 than on more
channels (ppocr_cls at ratio 0.25: 0.78x dense latency unrounded, 1.19x with the default 8).
An attention head is one neuron of its Q/K/V projections (all its channels go together, see
:mod:`.channels`), counted for rounding as its head size in channels.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from ..graph import model_graphs, opset_version, unique_name_factory, value_shapes, walk_graphs
from .base import Pass, PassResult, count
from .prune import activation_stats, check_choice, importance, input_norm, target_count
from .weights import PrunableTensor
from .channels import ChannelGraph, Producer, has_producers, union_roots

METHODS = ("l2", "wanda")


class PruneNeurons(Pass):
    name = "prune-neurons"
    summary = "zero the least important whole neurons/channels (with bias) where zero-rows can remove them"
    exact = False

    @dataclass(frozen=True)
    class Options:
        ratio: float = 0.5
        method: str = "l2"
        exclude: tuple[str, ...] = ()
        round_to: int = 8

        def __post_init__(self) -> None:
            if not 0.0 <= self.ratio < 1.0:
                raise InputError(f"prune-neurons: ratio must be in [0, 1), not {self.ratio}")
            if self.round_to < 1:
                raise InputError(f"prune-neurons: round_to must be >= 1, not {self.round_to}")
            check_choice("prune-neurons", "method", self.method, METHODS)

    def requires(self, model: onnx.ModelProto) -> None:
        if self.options.method == "wanda":
            self.context.calibration_feeds(self.name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"neurons_zeroed": 0, "neurons_removable": 0, "neuron_groups": 0}
        if not has_producers(model):  # before the shape inference the analysis needs
            stats["skipped_nothing_prunable"] = 1
            return PassResult(model, False, stats)
        shapes = value_shapes(model)
        opset = opset_version(model)
        excluded = frozenset(n.name for g in model_graphs(model) for n in g.node
                             if n.name and any(fnmatch.fnmatchcase(n.name, p) for p in self.options.exclude))
        analyses = [ChannelGraph(g, opset, shapes if g is model.graph else {}, assume_dead=True,
                                 exclude_nodes=excluded) for g in walk_graphs(model.graph)]
        tensors = [PrunableTensor(a.store, a.index, p.use.weight, [p.use], a.graph is model.graph)
                   for a in analyses for p in a.producers]
        if not tensors:
            stats["skipped_nothing_prunable"] = 1
            return PassResult(model, False, stats)
        norms = ({name: input_norm(inputs) for name, inputs in activation_stats(self, model, tensors, stats).items()}
                 if self.options.method == "wanda" else {})
        tensor_of = {id(t.use.node): t for t in tensors}
        new_name = unique_name_factory(model)
        for analysis in analyses:
            for reason, n in sorted(analysis.skips.items()):
                stats[f"skipped_{reason}"] = stats.get(f"skipped_{reason}", 0) + n
            for reason, n in sorted(analysis.kept.items()):
                stats[f"unprunable_{reason}"] = stats.get(f"unprunable_{reason}", 0) + n
            self._prune_graph(analysis, tensor_of, norms, stats, new_name)
        return PassResult(model, stats["neurons_zeroed"] > 0, stats)

    def _prune_graph(self, analysis: ChannelGraph, tensor_of: dict, norms: dict, stats: dict, new_name) -> None:
        roots = analysis.roots
        scores = np.zeros(len(roots))
        # Wanda ranks a neuron by the geometric mean of its own rows' score (|W| times the input norms) and
        # what it adds to the next layer (|W| times its activation norm, over the weights that read it);
        # neurons no weight reads, by their rows alone.
        read_scores, read = np.zeros(len(roots)), np.zeros(len(roots), bool)
        exits = {id(node): use for node, use in analysis.exits}
        links = []
        canonicals = {}  # producers with a channel that may be zeroed: their weight, read once
        width = np.ones(len(roots), np.int64)  # channels per neuron in a producer: a head's size, else 1
        for producer in analysis.producers:
            tensor = tensor_of[id(producer.node)]
            canonical = tensor.canonical()
            producer_roots = roots[analysis.values[producer.output].ids]
            neurons, channels = np.unique(producer_roots, return_counts=True)
            np.maximum.at(width, neurons, channels)
            if not analysis.blocked[producer_roots].all():
                canonicals[id(producer.node)] = canonical
            if self.options.method == "l2":
                row = np.square(canonical.astype(np.float64)).reshape(len(canonical), -1).sum(axis=1)
            else:
                # float64 sums: magnitude importance comes in the weight's own dtype
                score = np.maximum(importance(tensor, canonical, norms.get(tensor.name)), 0.0).astype(np.float64)
                row = score.reshape(len(canonical), -1).sum(axis=1)
                use = exits.get(id(producer.node))
                if use is not None:
                    inputs = roots[analysis.values[use.data].ids]
                    np.add.at(read_scores, inputs, _input_columns(score, use.groups))
                    read[inputs] = True
            np.add.at(scores, producer_roots, row)
            links.append((producer_roots, np.full_like(producer_roots, producer_roots[0])))
        scores = np.where(read, np.sqrt(read_scores * scores), scores)
        group_of = union_roots(len(roots), links)
        produced = np.unique(np.concatenate([link[0] for link in links]))
        conv_group = _conv_group_labels(analysis)
        chosen = np.zeros(len(roots), bool)
        for group in np.unique(group_of[produced]):
            members = produced[group_of[produced] == group]
            candidates = members[~analysis.blocked[members]]
            labels = np.unique(conv_group[members])  # a grouped Conv needs equally many from each of its groups
            asked = target_count(self.options.ratio, len(members))
            most = min(len(candidates), len(members) - 1)
            sizes = np.unique(width[members])  # heads of d channels: a multiple of round_to / gcd(d, round_to)
            multiple = self.options.round_to // math.gcd(int(sizes[0]), self.options.round_to) if len(sizes) == 1 \
                else self.options.round_to
            k = rounded_count(asked, len(members), most, len(labels), multiple)
            if k is None:  # too few channels or candidates for any multiple: prune as asked
                k = min(asked, most)
                if k:
                    count(stats, "groups_not_rounded")
            stats["neuron_groups"] += 1
            stats["neurons_removable"] += len(candidates)
            quota = k // len(labels)
            for label in labels:
                pool = candidates[conv_group[candidates] == label]
                chosen[pool[np.argsort(scores[pool], kind="stable")[:quota]]] = True
        analysis.balance(chosen)  # where grouped Convs still disagree, zero-rows would keep the excess
        stats["neurons_zeroed"] += int(chosen.sum())
        if heads := analysis.head_count(chosen):
            stats["heads_zeroed"] = stats.get("heads_zeroed", 0) + heads
        for producer in analysis.producers:
            rows = chosen[roots[analysis.values[producer.output].ids]]
            if rows.any():
                _zero_rows(analysis, producer, tensor_of[id(producer.node)], canonicals[id(producer.node)], rows,
                           new_name)


def rounded_count(asked: int, size: int, most: int, step: int, multiple: int) -> int | None:
    """How many of ``size`` channels to remove so that a multiple of ``multiple`` stay; None if none fits.

    Counts are multiples of ``step``, at most ``most`` and at most ``asked + multiple - 1``; the
    one nearest ``asked`` wins, the smaller on a tie.
    """
    fits = [k for k in range(0, min(most, asked + multiple - 1) + 1, step) if (size - k) % multiple == 0]
    return min(fits, key=lambda k: (abs(k - asked), k), default=None)


def _input_columns(score: np.ndarray, groups: int) -> np.ndarray:
    """A canonical ``(out, ..., in per group)`` score summed per input channel (grouped Conv aware)."""
    return score.reshape(groups, score.shape[0] // groups, -1, score.shape[-1]).sum(axis=(1, 2)).ravel()


def _conv_group_labels(analysis: ChannelGraph) -> np.ndarray:
    """Per variable: which group of a grouped Conv it enters or leaves (-1 for none)."""
    labels = np.full(len(analysis.roots), -1)
    offset = 0
    for ids, groups in analysis.balanced:
        labels[analysis.roots[ids].reshape(groups, -1)] = offset + np.arange(groups)[:, None]
        offset += groups
    return labels


def _zero_rows(analysis: ChannelGraph, producer: Producer, tensor: PrunableTensor, canonical: np.ndarray,
               rows: np.ndarray, new_name) -> None:
    """Zero a producer's weight rows (``canonical``: its weight as read for scoring) and their bias entries."""
    if not canonical.flags.writeable:
        canonical = canonical.copy()
    canonical[rows] = 0
    tensor.write_canonical(canonical)
    bias_name = producer.use.bias
    bias = analysis.constant(bias_name) if bias_name else None
    if bias is None or not bias.ndim or bias.shape[-1] != len(rows):
        return
    bias = bias.copy()
    bias[..., rows] = 0
    if bias_name in analysis.store:
        analysis.store.set_array(bias_name, bias)
    else:  # a bias computed from constants (Reshape of a Constant): give the node its own
        fresh = new_name(f"{producer.node.output[0]}_bias")
        analysis.store.add_initializer(fresh, bias)
        producer.node.input[2] = fresh
