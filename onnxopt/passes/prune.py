"""prune: zero the least important weights of MatMul / Gemm / Conv (lossy; pair with zero-rows).

``method=sparsegpt`` (Frantar & Alistarh 2023) also *updates* the surviving weights: layers are
pruned in topological order, each from its input's Hessian ``XᵀX`` as computed with the layers
before it already pruned (:mod:`onnxopt.reconstruction`: one streaming pass over the calibration
data in all, piece by piece), choosing weights by the OBS saliency ``w² / [H⁻¹]ₖₖ`` and spreading
each pruned weight's error over the inputs not yet visited. Each layer's damping is chosen among
``DAMPING_STEPS`` multiples by 2-fold cross-validation over the calibration batches (``choose_damping``):
rows that move together, like a sentence's tokens, over-fit a fixed one. Tied weights and weights inside
subgraphs have no single observable input: they fall back to magnitude and are counted.

Importance is ``|w|`` (magnitude) or ``|w| * ||x_in||_2`` (Wanda: the L2 norm of the input feature
or channel the weight multiplies, over the calibration data, from one streaming calibration run).
Wanda with ``bias_correction`` (the default) adds the pruned weights' mean contribution,
``sum(w_pruned * mean(x_in))``, to the bias and ranks by the norm of ``x_in - mean(x_in)``, the
error that then remains. This lowers output error most where inputs have a large mean (after
Relu); benchmarks/bench_prune.py compares it with magnitude.
Targets are met exactly, ties included: existing zeros rank first, then exactly
``round(sparsity * size)`` weights are zero per tensor (layer scope) or over all eligible tensors
(global scope). ``N:M`` patterns keep the N most important of every M consecutive weights along
the input axis (input channels for Conv), the layout sparse tensor cores accelerate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from .base import Pass, PassResult, check_choice, count
from ..calibration import TensorStats
from ..data import FeedSet
from ..graph import unique_name_factory
from ..reconstruction import LayerGeometry, LayerStatistics, SolverError, blas_threads, masked_refit, sparsegpt
from ..reconstruction.stream import LayerwiseRunner, ShardedRunner
from .importance import activation_stats, importance, input_norm, target_count
from .weights import BiasAdder, PrunableTensor, attribute, find_prunable, mean_contribution

METHODS = ("magnitude", "wanda", "sparsegpt")
# sparsegpt's refit toward the dense output is distill's ridge (its default damping): with 0.01, the refit
# overfits the calibration rows (minilm_l3 after distill: 0.9733 instead of 0.9749)
REFIT_DAMPING = 0.1
SCOPES = ("layer", "global")
DAMPING_STEPS = (1, 4, 16)  # sparsegpt: the dampings tried per layer, as multiples of the option's


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``unstructured`` -> None; ``"2:4"`` -> (2, 4)."""
    if pattern == "unstructured":
        return None
    keep, sep, group = pattern.partition(":")
    if sep and keep.isdigit() and group.isdigit() and 0 < int(keep) < int(group):
        return int(keep), int(group)
    raise InputError(f"prune: pattern must be 'unstructured' or N:M with 0 < N < M (like 2:4), not '{pattern}'")


def memory_order(array: np.ndarray) -> np.ndarray:
    """The array's elements in memory order: a view for the transposed canonical views used here."""
    return array.ravel(order="K")


def threshold_mask(score: np.ndarray, kth, ties: int, below: np.ndarray | None = None) -> np.ndarray:
    """True below ``kth``, and at the first ``ties`` positions (memory order) equal to it
    (``below``: ``score < kth`` when the caller has it already)."""
    mask = np.less(score, kth) if below is None else below
    if ties > 0:
        flat = memory_order(mask)
        flat[np.flatnonzero(memory_order(score) == kth)[:ties]] = True
    return mask


def smallest_mask(score: np.ndarray, k: int, work: np.ndarray | None = None) -> np.ndarray:
    """True at exactly ``k`` positions holding the smallest scores (ties: first in memory order).

    ``work``: a flat array of the score's size and dtype to select in (else a copy is made).
    """
    if k <= 0:
        return np.zeros(score.shape, dtype=bool)
    if k >= score.size:
        return np.ones(score.shape, dtype=bool)
    if work is None:
        work = np.empty(score.size, score.dtype)
    np.copyto(work, memory_order(score))
    work.partition(k - 1)
    mask = np.less(score, work[k - 1])
    return threshold_mask(score, work[k - 1], k - int(np.count_nonzero(mask)), mask)


def global_kth(scores, sizes: list[int], k: int, sample: int = 1 << 20, seed: int = 0) -> tuple[float, int]:
    """The ``k``-th smallest (``k >= 1``) of all scores, and how many scores are smaller than it.

    ``scores()`` yields each tensor's scores again on every call, so only one tensor's and a small
    window around the target are held at a time (a multi-GB model is never scored whole): a random
    sample brackets the k-th score, one more pass counts what lies below the bracket and keeps
    what lies inside, and the window's partition gives the exact value (values equal to a bracket end, such as the many
    existing zeros, are counted, not kept). A bracket the sample got wrong (improbable) is widened
    to the open side and counted again.
    """
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    picked = [memory_order(s)[rng.integers(0, s.size, max(1, round(sample * s.size / total)))] for s in scores()]
    sampled = np.sort(np.concatenate(picked))
    n = sampled.size
    margin = 6 * math.isqrt(n) + 8
    at = k / total * n
    low = sampled[int(at) - margin] if int(at) - margin >= 0 else -np.inf
    high = sampled[int(at) + margin] if int(at) + margin < n else np.inf
    while True:
        below = at_low = at_high = 0
        window = []
        for s in scores():
            flat = memory_order(s)
            below += int(np.count_nonzero(flat < low))
            at_low += int(np.count_nonzero(flat == low))
            at_high += int(np.count_nonzero(flat == high)) if high != low else 0
            window.append(flat[(flat > low) & (flat < high)])
        inside = np.concatenate(window)
        if k <= below:
            low, high = -np.inf, low
        elif k <= below + at_low:
            return low, below
        elif k <= below + at_low + inside.size:
            kth = np.partition(inside, k - below - at_low - 1)[k - below - at_low - 1]
            return kth, below + at_low + int(np.count_nonzero(inside < kth))
        elif k <= below + at_low + inside.size + at_high:
            return high, below + at_low + inside.size
        else:
            low, high = high, np.inf


def n_m_mask(score: np.ndarray, keep: int, group: int) -> np.ndarray:
    """True at the ``group - keep`` smallest of every ``group`` consecutive scores along the last axis."""
    blocks = score.reshape(*score.shape[:-1], score.shape[-1] // group, group)
    drop = np.argsort(blocks, axis=-1, kind="stable")[..., : group - keep]
    mask = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(mask, drop, True, axis=-1)
    return mask.reshape(score.shape)


class Scratch:
    """Work arrays reused from one tensor to the next, by role. A 4096x4096 float32 weight is 64 MB,
    and every fresh array that size is a new memory mapping whose pages fault in one by one: on a
    multi-GB model that costs more than the arithmetic on them."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def __call__(self, role: str, size: int, dtype) -> np.ndarray:
        """A flat array of ``size`` elements for ``role``, holding whatever was left there."""
        held = self._arrays.get(role)
        if held is None or held.size < size or held.dtype != np.dtype(dtype):
            held = self._arrays[role] = np.empty(size, dtype)
        return held[:size]


def zeros(array: np.ndarray) -> int:
    return int(np.count_nonzero(array == 0))


def zero_where(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``weight`` with +0.0 where ``mask``: in place when it is writable (its bits cleared, five times
    faster than a masked assignment), else a new array."""
    if not weight.flags.writeable:
        return np.where(mask, np.zeros((), weight.dtype), weight)
    bits = weight.view(f"u{weight.itemsize}")
    np.multiply(bits, np.logical_not(mask), out=bits)
    return weight


class Prune(Pass):
    name = "prune"
    summary = "zero the least important MatMul/Gemm/Conv weights (magnitude, Wanda or SparseGPT; unstructured or N:M)"
    exact = False

    @dataclass(frozen=True)
    class Options:
        sparsity: float = 0.5
        method: str = "magnitude"
        scope: str = "layer"
        pattern: str = "unstructured"
        exclude: tuple[str, ...] = ()
        min_size: int = 0
        bias_correction: bool = True  # wanda and sparsegpt
        damping: float = 0.01  # sparsegpt: relative to the mean input energy, raised when the Hessian is singular
        dense_target: bool = True  # sparsegpt: fit each layer to the unpruned model's output, not its own
        choose_damping: bool = True  # sparsegpt: per layer, damping x 1, 4 or 16, by 2-fold cross-validation

        def __post_init__(self) -> None:
            if not 0.0 <= self.sparsity < 1.0:
                raise InputError(f"prune: sparsity must be in [0, 1), not {self.sparsity}")
            check_choice("prune", "method", self.method, METHODS)
            check_choice("prune", "scope", self.scope, SCOPES)
            n_m = parse_pattern(self.pattern)
            if n_m is not None:
                if self.scope == "global":
                    raise InputError("prune: scope=global works with pattern=unstructured only")
                if not math.isclose(self.sparsity, 1 - n_m[0] / n_m[1]):
                    raise InputError(f"prune: pattern {self.pattern} fixes sparsity at {1 - n_m[0] / n_m[1]:g}; "
                                     f"got sparsity={self.sparsity}")
            if self.min_size < 0:
                raise InputError(f"prune: min_size must be >= 0, not {self.min_size}")
            if not self.damping > 0:
                raise InputError(f"prune: damping must be > 0, not {self.damping}")

    def requires(self, model: onnx.ModelProto) -> None:
        if self.options.method in ("wanda", "sparsegpt"):
            self.context.calibration_feeds(self.name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        opts = self.options
        stats: dict[str, int | float] = {"tensors_pruned": 0, "weights_eligible": 0, "weights_zero_before": 0,
                                         "weights_zero_after": 0}
        tensors = find_prunable(model, stats, exclude=opts.exclude, min_size=opts.min_size)
        n_m = parse_pattern(opts.pattern)
        if n_m is not None:
            tensors = self._divisible(tensors, n_m[1], stats)
        if not tensors:
            stats["skipped_nothing_prunable"] = 1
            return PassResult(model, False, stats)
        if opts.method == "sparsegpt":
            return self._sparsegpt(model, tensors, n_m, stats)
        inputs = activation_stats(self, model, tensors, stats) if opts.method == "wanda" else {}
        correct = opts.method == "wanda" and opts.bias_correction
        norms = {name: input_norm(used, correct) for name, used in inputs.items()}
        top = next((t for t in tensors if t.top_level), None)  # bias correction is for top-level weights only
        adder = BiasAdder(top.index, top.store, unique_name_factory(model)) if correct and top else None
        for tensor, weight, mask in self._masks(tensors, norms, n_m):
            before = zeros(weight)
            removed = np.where(mask, weight, np.zeros((), weight.dtype)) if adder is not None else None
            if _record(stats, tensor, before, zero_where(weight, mask)) and removed is not None and tensor.name in inputs:
                _correct_bias(adder, tensor, removed, inputs[tensor.name])  # top-level weights only
                count(stats, "biases_corrected", len(tensor.uses))
        if adder is not None:
            adder.finish()
        stats["sparsity"] = stats["weights_zero_after"] / stats["weights_eligible"]
        return PassResult(model, stats["tensors_pruned"] > 0, stats)

    def _sparsegpt(self, model: onnx.ModelProto, tensors: list[PrunableTensor], n_m, stats) -> PassResult:
        """Prune layer by layer in topological order from each input's Hessian, updating the survivors."""
        opts = self.options
        alone = [t for t in tensors if t.top_level and len(t.uses) == 1]
        others = [t for t in tensors if not (t.top_level and len(t.uses) == 1)]
        if others:  # no single observable input: magnitude, within the same budgets
            count(stats, "sparsegpt_fallback_magnitude_in_subgraph", sum(not t.top_level for t in others))
            count(stats, "sparsegpt_fallback_magnitude_tied", sum(t.top_level for t in others))
        if opts.scope == "global":  # per-tensor budgets from one global Wanda ranking
            inputs = activation_stats(self, model, alone, stats) if alone else {}
            norms = {name: input_norm(used) for name, used in inputs.items()}
            budgets = {t.name: int(np.count_nonzero(mask)) for t, _, mask in self._masks(tensors, norms, None)}
        else:
            budgets = {t.name: target_count(opts.sparsity, t.size) for t in tensors}
        for tensor in others:
            weight = tensor.canonical()
            _record(stats, tensor, zeros(weight), _magnitude(tensor, weight, budgets[tensor.name], n_m))
        if alone:
            order = {id(node): i for i, node in enumerate(alone[0].index.nodes)}
            position = {i: p for p, i in enumerate(alone[0].index.topological_order())}
            alone.sort(key=lambda t: position[order[id(t.use.node)]])
            feeds = self.context.calibration_feeds(self.name)
            executor = self.context.executor
            sharded = executor is not None and isinstance(feeds, FeedSet)
            # dense targets: the same model, never changed, run beside it (on each shard's worker when sharded)
            runner = (ShardedRunner(executor, model, feeds, teacher=model if opts.dense_target else None) if sharded
                      else LayerwiseRunner(model, feeds))
            dense = LayerwiseRunner(model, feeds) if opts.dense_target and not sharded else None
            adder = BiasAdder(alone[0].index, alone[0].store, unique_name_factory(model)) if opts.bias_correction else None
            deferred: list[tuple[onnx.NodeProto, np.ndarray]] = []
            now, later = (adder.add if adder else None), (lambda node, delta: deferred.append((node, delta)))
            for number, tensor in enumerate(alone, 1):
                weight = tensor.canonical()
                pruned, bias = self._sparsegpt_layer(tensor, weight, runner, dense, budgets[tensor.name], n_m, stats,
                                                     adder is not None)
                if _record(stats, tensor, zeros(weight), pruned):
                    if bias is not None:
                        # a MatMul gets an Add after it, renaming its output: only once the runner is done
                        (later if tensor.use.node.op_type == "MatMul" else now)(tensor.use.node,
                                                                                bias.astype(weight.dtype))
                        count(stats, "biases_corrected")
                    runner.changed(tensor.use.node)
                if self.context.progress:
                    import click

                    click.echo(f"prune: layer {number}/{len(alone)} {tensor.use.node.name or tensor.name}", err=True)
            if isinstance(runner, ShardedRunner):
                runner.close()
            for node, delta in deferred:
                adder.add(node, delta)
            if adder is not None:
                adder.finish()
        stats["sparsity"] = stats["weights_zero_after"] / stats["weights_eligible"]
        return PassResult(model, stats["tensors_pruned"] > 0, stats)

    def _sparsegpt_layer(self, tensor: PrunableTensor, weight: np.ndarray, runner: LayerwiseRunner | ShardedRunner,
                         dense: LayerwiseRunner | None, zeros: int, n_m, stats, with_bias: bool
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """One layer: its Hessian from the runner's current input, SparseGPT per group, in canonical layout.

        With ``with_bias`` the Hessian gets a ones column and the weights a bias row that is never
        pruned: returns the bias change (output units) that compensates the pruned weights' mean too.
        With ``dense`` (the same model run before each layer is pruned: it runs the layer with its
        dense weights, so it never sees a pruned one), the layer is fitted to the dense model's
        output rather than to its own on the pruned inputs: the drift upstream is corrected too.
        """
        use = tensor.use
        dims = tuple(tensor.store.tensor(tensor.name).dims)
        geometry = (LayerGeometry.conv(use.node, dims) if use.node.op_type == "Conv"
                    else LayerGeometry.linear(dims[use.in_axis], dims[use.out_axis], use.data_axis))
        folds = None
        if isinstance(runner, ShardedRunner):  # sums merged per shard: no folds of them here
            sums = (runner.pair_statistics(use.data, use.node.output[0], geometry, bias=with_bias)
                    if runner.teacher is not None else runner.statistics(use.data, geometry, bias=with_bias))
            if self.options.choose_damping:
                count(stats, "damping_choice_skipped_executor")
        else:
            x = runner.values([use.data])[use.data]
            reference = dense.values([use.data, use.node.output[0]])[use.data] if dense is not None else None
            if reference is not None and all(np.array_equal(a, b) for a, b in zip(x, reference)):
                reference = None  # no drift yet (nothing upstream pruned): the layer's own output is the dense one
            # with choose_damping, two folds of the batches (every other one), summed apart and merged
            halves = self.options.choose_damping and len(x) > 1
            parts = [x[0::2], x[1::2]] if halves else [x]
            references = [None] * len(parts) if reference is None else \
                [reference[0::2], reference[1::2]] if halves else [reference]
            parts_sums = [LayerStatistics.empty(geometry, bias=with_bias) for _ in parts]
            with blas_threads(geometry.work(x) * (1 + (reference is not None))):  # small layers: one thread
                fitted = all(f.update_pair(geometry, p, r) if r is not None else f.update_batches(geometry, p)
                             for f, p, r in zip(parts_sums, parts, references))
            sums = None if not fitted else parts_sums[0].merge(parts_sums[1]) if halves else parts_sums[0]
            folds = parts_sums if fitted and halves else None
        if sums is None:
            count(stats, "sparsegpt_fallback_magnitude_unobservable")
            return _magnitude(tensor, weight, zeros, n_m), None
        with blas_threads(float(sums.rows) * geometry.inputs**2 * geometry.groups):  # small layers on one thread
            return self._sparsegpt_groups(tensor, weight, geometry, sums, zeros, n_m, stats, with_bias, folds)

    def _sparsegpt_groups(self, tensor, weight, geometry, sums, zeros, n_m, stats, with_bias, folds=None):
        """SparseGPT per group from the layer's statistics; see :meth:`_sparsegpt_layer`.

        With ``folds`` (two halves of the statistics) the damping is chosen per layer among
        ``damping x DAMPING_STEPS``: the one whose solutions from each fold fit the other fold best
        (2-fold cross-validation of the layer's output error)."""
        use = tensor.use
        g = geometry
        per_group = np.swapaxes(weight.reshape(g.groups, g.outputs, g.inputs), 1, 2).astype(np.float64)  # (G, K, N)
        if with_bias:  # a bias row starting at zero: what it ends at is the change
            per_group = np.concatenate([per_group, np.zeros((g.groups, 1, g.outputs))], axis=1)
        splits = [target_count(zeros / weight.size, g.inputs * g.outputs * (i + 1)) for i in range(g.groups)]
        # fewer calibration rows than inputs leave Hessian directions unobserved; OBS updates would move
        # the weights freely along them (overfitting): damp by how far short of the inputs the rows fall
        damping = self.options.damping + max(0.0, g.inputs / max(sums.rows, 1) - 0.5)
        pruned = np.empty(per_group.shape)

        def solve(statistics: LayerStatistics, i: int, budget: int, damping: float) -> tuple[np.ndarray, float]:
            start = per_group[i]
            if statistics.cross is not None:  # the dense model's output as the target: zeros stay, the rest refit
                keep = start != 0
                keep[g.inputs:] = True
                start, _ = masked_refit(statistics.gram[i], statistics.cross[i] @ start, start,
                                        None if keep.all() else keep, max(damping, REFIT_DAMPING))
            return sparsegpt(start, statistics.gram[i], zeros=budget, n_m=n_m, damping=damping,
                             fixed_rows=int(with_bias))

        for i in range(g.groups):
            budget = splits[i] - (splits[i - 1] if i else 0)
            try:
                chosen = damping
                if folds is not None:
                    candidates = [damping * step for step in DAMPING_STEPS]
                    errors = [sum(held.fit_error(i, solve(fit, i, budget, d)[0], per_group[i])
                                  for fit, held in (folds, folds[::-1])) for d in candidates]
                    chosen = candidates[int(np.argmin(errors))]
                    stats["damping_chosen_max"] = max(float(stats.get("damping_chosen_max", 0.0)), chosen)
                    count(stats, "damping_chosen_above_default", int(chosen > damping))
                pruned[i], used = solve(sums, i, budget, chosen)
            except SolverError as exc:
                raise InputError(f"prune: layer '{use.node.name or tensor.name}': {exc}") from None
            if used > chosen:
                count(stats, "damping_raised")
        bias = None
        if with_bias:
            bias = pruned[:, -1].reshape(-1) * (attribute(use.node, "alpha", 1.0) if use.node.op_type == "Gemm" else 1.0)
            pruned = pruned[:, :-1]
        return np.swapaxes(pruned, 1, 2).reshape(weight.shape).astype(weight.dtype), bias

    def _divisible(self, tensors: list[PrunableTensor], group: int, stats) -> list[PrunableTensor]:
        kept = [t for t in tensors if t.store.tensor(t.name).dims[t.use.in_axis] % group == 0]
        count(stats, "skipped_inputs_not_divisible_by_m", len(tensors) - len(kept))
        return kept

    def _masks(self, tensors: list[PrunableTensor], norms: dict[str, np.ndarray], n_m: tuple[int, int] | None):
        """(tensor, canonical weight, where to zero it), one tensor at a time: a multi-GB model is
        never read whole. A global budget finds its threshold first (:func:`global_kth`). The weight
        and its scores live in buffers reused for the next tensor (the caller is done with them by
        then), and the weight is the caller's to change."""
        sparsity = self.options.sparsity
        scratch = Scratch()

        def scored(tensor: PrunableTensor) -> tuple[np.ndarray, np.ndarray]:
            weight = tensor.canonical(scratch("weight", tensor.size, tensor.dtype))
            norm = norms.get(tensor.name)
            score = tensor.canonical_view(scratch("score", tensor.size, tensor.dtype if norm is None else np.float64))
            return weight, importance(tensor, weight, norm, score)

        if n_m is None and self.options.scope == "global":
            sizes = [t.size for t in tensors]
            budget = target_count(sparsity, sum(sizes))
            kth, smaller = (global_kth(lambda: (scored(t)[1] for t in tensors), sizes, budget) if budget
                            else (-np.inf, 0))
            ties = budget - smaller
        for tensor in tensors:
            weight, score = scored(tensor)
            if n_m is not None:
                mask = n_m_mask(score, *n_m)
            elif self.options.scope == "layer":
                mask = smallest_mask(score, target_count(sparsity, score.size), scratch("work", score.size, score.dtype))
            else:
                mask = threshold_mask(score, kth, ties)
                ties -= min(ties, int(np.count_nonzero(score == kth)))
            yield tensor, weight, mask


def _magnitude(tensor: PrunableTensor, weight: np.ndarray, zeros: int, n_m) -> np.ndarray:
    """The weight pruned by magnitude (sparsegpt's fallback), ``zeros`` of them or N:M."""
    score = importance(tensor, weight, None)
    mask = n_m_mask(score, *n_m) if n_m else smallest_mask(score, zeros)
    return np.where(mask, np.zeros((), weight.dtype), weight)


def _record(stats: dict[str, int | float], tensor: PrunableTensor, before: int, pruned: np.ndarray) -> bool:
    """Count a tensor's zeros, ``before`` pruning and after; write it when pruning added zeros (True then)."""
    stats["weights_eligible"] += int(pruned.size)
    stats["weights_zero_before"] += before
    after = zeros(pruned)
    stats["weights_zero_after"] += after
    if after <= before:
        return False
    tensor.write_canonical(pruned)
    stats["tensors_pruned"] += 1
    return True


def _correct_bias(adder: BiasAdder, tensor: PrunableTensor, removed: np.ndarray, inputs: list[TensorStats]) -> None:
    """Add each use's expected loss, ``sum(removed * mean(input))`` per output, back to its output."""
    for use, input_stats in zip(tensor.uses, inputs):
        delta = mean_contribution(removed, input_stats.channel_sum / input_stats.channel_count, use.groups)
        if use.node.op_type == "Gemm":
            delta = delta * attribute(use.node, "alpha", 1.0)
        adder.add(use.node, delta.astype(removed.dtype))
