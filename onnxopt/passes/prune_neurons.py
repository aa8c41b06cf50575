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

``method=fluctuation`` (FLAP, An et al. 2024) ranks a neuron by the output error its removal
leaves in the layers that read it, ``sum(W_ij^2) * var(x_j)`` over the consumer weights, once its
mean is folded into their bias. ``bias_correction`` (methods with calibration) does that fold:
each consumer's bias gains ``W[:, j] * (mean(x_j) - c_j)`` for a zeroed neuron whose input
becomes the constant ``c_j``. ``scope=global`` spends one budget, ``ratio`` of the weights of
every prunable neuron, across all groups, lowest error per weight first: a transformer then
keeps the heads that cost most to lose and takes more MLP units instead (the sample at 0.25:
cosine 0.93 with a head gone, 0.99 without). Neurons no measured weight reads (summed by a
ReduceSum) rank by the energy of their own rows.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..calibration import TensorStats
from ..errors import InputError
from ..graph import model_graphs, opset_version, unique_name_factory, value_shapes, walk_graphs
from .base import Pass, PassResult, check_choice, count
from .channels import ChannelGraph, Producer, has_producers, union_roots
from .importance import activation_stats, importance, input_norm, target_count
from .weights import BiasAdder, PrunableTensor, attribute, mean_contribution, per_input_channel

METHODS = ("l2", "wanda", "fluctuation")
SCOPES = ("group", "global")


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
        scope: str = "group"
        bias_correction: bool = True

        def __post_init__(self) -> None:
            if not 0.0 <= self.ratio < 1.0:
                raise InputError(f"prune-neurons: ratio must be in [0, 1), not {self.ratio}")
            if self.round_to < 1:
                raise InputError(f"prune-neurons: round_to must be >= 1, not {self.round_to}")
            check_choice("prune-neurons", "method", self.method, METHODS)
            check_choice("prune-neurons", "scope", self.scope, SCOPES)

    def requires(self, model: onnx.ModelProto) -> None:
        if self.options.method != "l2":
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
        inputs = activation_stats(self, model, tensors, stats) if self.options.method != "l2" else {}
        tensor_of = {id(t.use.node): t for t in tensors}
        new_name = unique_name_factory(model)
        for analysis in analyses:
            for reason, n in sorted(analysis.skips.items()):
                stats[f"skipped_{reason}"] = stats.get(f"skipped_{reason}", 0) + n
            for reason, n in sorted(analysis.kept.items()):
                stats[f"unprunable_{reason}"] = stats.get(f"unprunable_{reason}", 0) + n
            self._prune_graph(analysis, tensor_of, inputs, stats, new_name)
        return PassResult(model, stats["neurons_zeroed"] > 0, stats)

    def _prune_graph(self, analysis: ChannelGraph, tensor_of: dict, inputs: dict[str, list[TensorStats]],
                     stats: dict, new_name) -> None:
        if not analysis.producers:  # a subgraph without weights of its own
            return
        roots = analysis.roots
        method = self.options.method
        scores = np.zeros(len(roots))
        # Wanda ranks a neuron by the geometric mean of its own rows' score (|W| times the input norms) and
        # what it adds to the next layer (|W| times its activation norm, over the weights that read it);
        # fluctuation by the latter alone, squared and about the mean (var(x) * W^2); neurons no weight
        # reads, by their rows alone.
        read_scores, read = np.zeros(len(roots)), np.zeros(len(roots), bool)
        cost = np.zeros(len(roots))  # weights and bias entries that go with each neuron (scope=global)
        exits = {id(node): use for node, use in analysis.exits}
        links = []
        canonicals = {}  # producers with a channel that may be zeroed or that read one: their weight, read once
        width = np.ones(len(roots), np.int64)  # channels per neuron in a producer: a head's size, else 1
        for producer in analysis.producers:
            tensor = tensor_of[id(producer.node)]
            canonical = tensor.canonical()
            producer_roots = roots[analysis.values[producer.output].ids]
            neurons, channels = np.unique(producer_roots, return_counts=True)
            np.maximum.at(width, neurons, channels)
            use = exits.get(id(producer.node))
            inputs_read = roots[analysis.values[use.data].ids] if use is not None else producer_roots[:0]
            if not (analysis.blocked[producer_roots].all() and analysis.blocked[inputs_read].all()):
                canonicals[id(producer.node)] = canonical
            observed = inputs.get(tensor.name) if tensor.top_level else None  # none inside subgraphs
            np.add.at(cost, producer_roots, canonical[0].size + (producer.use.bias is not None))
            if method == "l2":
                row = np.square(canonical.astype(np.float64)).reshape(len(canonical), -1).sum(axis=1)
            elif method == "wanda":
                # float64 sums: magnitude importance (no calibration stats) comes in the weight's own dtype
                score = np.maximum(importance(tensor, canonical, input_norm(observed) if observed else None),
                                   0.0).astype(np.float64)
                row = score.reshape(len(canonical), -1).sum(axis=1)
            else:
                square = np.square(canonical.astype(np.float64))
                mean, variance = _moments(observed) if observed else (0.0, 1.0)  # unobserved: by magnitude
                energy = np.broadcast_to(mean ** 2 + variance, canonical.shape[-1] * producer.use.groups)
                row = (square * per_input_channel(canonical.shape, energy, producer.use.groups)
                       ).reshape(len(canonical), -1).sum(axis=1)
            if use is not None:
                np.add.at(cost, inputs_read, canonical.size // (canonical.shape[-1] * use.groups))
                if method == "wanda":
                    np.add.at(read_scores, inputs_read, _input_columns(score, use.groups))
                    read[inputs_read] = True
                elif method == "fluctuation" and observed:
                    np.add.at(read_scores, inputs_read, _input_columns(square, use.groups) * variance)
                    read[inputs_read] = True
            np.add.at(scores, producer_roots, row)
            links.append((producer_roots, np.full_like(producer_roots, producer_roots[0])))
        if method == "wanda":
            scores = np.where(read, np.sqrt(read_scores * scores), scores)
        elif method == "fluctuation":
            scores = np.where(read, read_scores, scores)
        group_of = union_roots(len(roots), links)
        produced = np.unique(np.concatenate([link[0] for link in links]))
        conv_group = _conv_group_labels(analysis)
        plans = []
        for group in np.unique(group_of[produced]):
            members = produced[group_of[produced] == group]
            plans.append((members, members[~analysis.blocked[members]]))
        asked = (self._global_counts(plans, scores, cost) if self.options.scope == "global"
                 else [target_count(self.options.ratio, len(members)) for members, _ in plans])
        chosen = np.zeros(len(roots), bool)
        for (members, candidates), wanted in zip(plans, asked):
            labels = np.unique(conv_group[members])  # a grouped Conv needs equally many from each of its groups
            most = min(len(candidates), len(members) - 1)
            sizes = np.unique(width[members])  # heads of d channels: a multiple of round_to / gcd(d, round_to)
            multiple = self.options.round_to // math.gcd(int(sizes[0]), self.options.round_to) if len(sizes) == 1 \
                else self.options.round_to
            k = rounded_count(wanted, len(members), most, len(labels), multiple) if wanted else 0
            if k is None:  # too few channels or candidates for any multiple: prune as asked
                k = min(wanted, most)
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
        if self.options.bias_correction and inputs and chosen.any():
            _correct_biases(analysis, chosen, tensor_of, canonicals, inputs, new_name, stats)

    def _global_counts(self, plans: list[tuple[np.ndarray, np.ndarray]], scores: np.ndarray, cost: np.ndarray
                       ) -> list[int]:
        """Per group, how many neurons one budget takes: ``ratio`` of the weights of every candidate,
        spent on the lowest score per weight first (each group keeps one neuron)."""
        pool = np.concatenate([candidates for _, candidates in plans])
        owner = np.concatenate([np.full(len(candidates), i) for i, (_, candidates) in enumerate(plans)])
        budget = self.options.ratio * float(cost[pool].sum())
        room = [min(len(candidates), len(members) - 1) for members, candidates in plans]
        counts, spent = [0] * len(plans), 0.0
        for i in np.argsort(scores[pool] / cost[pool], kind="stable").tolist():
            group, price = owner[i], float(cost[pool[i]])
            if counts[group] < room[group] and spent + price <= budget + price / 2:
                counts[group] += 1
                spent += price
        return counts


def _moments(inputs: list[TensorStats]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each input channel over the calibration data (a tied weight: over all its inputs)."""
    n = max(sum(s.channel_count for s in inputs), 1)
    mean = sum(s.channel_sum for s in inputs) / n
    return mean, np.maximum(sum(s.channel_sumsq for s in inputs) / n - mean ** 2, 0.0)


def _correct_biases(analysis: ChannelGraph, chosen: np.ndarray, tensor_of: dict, canonicals: dict,
                    inputs: dict[str, list[TensorStats]], new_name, stats: dict) -> None:
    """Give every layer reading a zeroed neuron its mean back: ``W[:, j] * (mean(x_j) - c_j)`` into the bias,
    ``c_j`` the constant the neuron's input now holds (zero-rows folds that one itself)."""
    adder = BiasAdder(analysis.index, analysis.store, new_name, analysis.constant)
    roots = analysis.roots
    for node, use in analysis.exits:
        tensor = tensor_of[id(node)]
        data = analysis.values[use.data]
        removed = chosen[roots[data.ids]]
        if not removed.any() or not tensor.top_level or tensor.name not in inputs:
            continue
        shift = np.where(removed, _moments(inputs[tensor.name])[0] - data.value, 0.0)
        canonical = canonicals[id(node)]  # its own zeroed rows are zero already: masked below
        delta = mean_contribution(canonical, shift, use.groups)
        if node.op_type == "Gemm":
            delta *= attribute(node, "alpha", 1.0)
        delta[chosen[roots[analysis.values[node.output[0]].ids]]] = 0.0  # its own zeroed rows stay dead
        adder.add(node, delta.astype(canonical.dtype))
        count(stats, "biases_corrected")
    adder.finish()


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
