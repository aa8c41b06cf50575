"""Streaming calibration: each batch runs through onnxruntime once, reduced inside the session.

The model is observed through a *calibration graph*: per observed tensor, reduction nodes are
appended (ReduceMin/ReduceMax over all axes, per-channel ReduceSum / ReduceSumSquare, a strided
per-sample subsample for histograms), so only small results cross into Python; onnxruntime frees
each activation as soon as its reductions have read it. The nodes are added to the caller's model
only while the session is created (the weights are not copied) and removed again.

Statistics are mergeable (shards merge into the same result as one run) and keep nothing per
sample, so memory does not grow with the number of samples.

Histograms use a *fixed, data-independent grid* instead of a min/max pass followed by a
fixed-range histogram pass: a value's bin is the top 16 bits of its float32 pattern (sign,
exponent, 7 mantissa bits: the bfloat16 grid, 0.8 % relative resolution). Counting is an
exact ``bincount``, so the histogram is identical for any batch size, chunking or order,
and one pass suffices. Uniform histograms over ``[min, max]`` are derived from it on demand
(:meth:`TensorStats.histogram`). Each sample is histogrammed on a fixed systematic subsample
(every ``stride``-th value, at most ``HIST_PER_SAMPLE``; the stride is fixed from the first run, so
it is the same for every sample and batching); min/max and channel sums always see every value.
Channel sums are float32 within a row of one sample, float64 across rows (``Cast`` in the graph),
sums of squares float64 throughout: results depend on batching only by float64 rounding.

By default samples of a :class:`FeedSet` run in joined batches when the model's batch axis is
dynamic and a probe shows that joining changes no sample; the batch size depends on the values
per sample only, never on the number of samples, so peak memory does not either.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .data import FeedSet, input_dims, model_inputs
from .errors import InputError
from .graph import defined_names, model_graphs, unique_name_factory
from .validate import Session

GRID_SIZE = 1 << 16
FLUSH_AT = 1 << 16  # grid codes buffered per tensor before one bincount (bounded memory, fewer passes)
HIST_PER_SAMPLE = 512  # at most this many values per tensor and sample go into the histogram
BATCH_VALUES = 8 << 20  # automatic batching: values of the largest observed tensor per joined batch (bounds memory)
MAX_BATCH = 16  # automatic batching: samples per joined batch
INT64_MAX = np.iinfo(np.int64).max


def _grid_centers() -> np.ndarray:
    """Value at the centre of each bfloat16 bin (NaN for the Inf/NaN codes)."""
    codes = np.arange(GRID_SIZE, dtype=np.uint32)
    with np.errstate(invalid="ignore"):  # the NaN codes
        lower = (codes << 16).view(np.float32).astype(np.float64)
        upper = ((codes + 1) << 16).view(np.float32).astype(np.float64)
    exponent = (codes >> 7) & 0xFF
    centers = (lower + upper) / 2
    centers[exponent == 0xFF] = np.nan
    centers[(codes & 0x7FFF) == 0x7F7F] = lower[(codes & 0x7FFF) == 0x7F7F]  # last finite bin
    return centers


GRID_CENTERS = _grid_centers()


@dataclass
class TensorStats:
    """Mergeable statistics of one tensor over every calibration value seen.

    ``count`` values in all; ``codes`` counts values per bfloat16 grid bin (when histograms are
    on; every ``stride``-th value of each sample); ``channel_sum`` (and ``channel_sumsq`` when
    asked for) sum values (and squares) per channel over all other axes (``channel_count``
    values per channel), when a channel axis was asked for.
    """

    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    bins: int = 0
    codes: np.ndarray | None = None
    channel_sum: np.ndarray | None = None
    channel_sumsq: np.ndarray | None = None
    channel_count: int = 0
    stride: int = 0
    _pending: list = field(default_factory=list, repr=False, compare=False)
    _pending_n: int = field(default=0, repr=False, compare=False)

    def add(self, count: int, low: float, high: float, picked: np.ndarray | None = None,
            sums: np.ndarray | None = None, sumsq: np.ndarray | None = None) -> None:
        """Fold one batch's reductions in: ``count`` values within [low, high], the histogram
        subsample ``picked`` (float32), per-channel float64 ``sums`` / ``sumsq``."""
        if not count:
            return
        self.count += count
        # +0.0 turns -0.0 into 0.0, so the result does not depend on which zero came first
        self.min = min(self.min, float(low) + 0.0)
        self.max = max(self.max, float(high) + 0.0)
        if picked is not None:
            self._pending.append((np.ascontiguousarray(picked, np.float32).reshape(-1).view(np.uint32) >> 16)
                                 .astype(np.uint16))
            self._pending_n += picked.size
            if self._pending_n >= FLUSH_AT:
                self.flush()
        if sums is not None:
            self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
            self.channel_count += count // max(sums.size, 1)
        if sumsq is not None:
            self.channel_sumsq = sumsq if self.channel_sumsq is None else self.channel_sumsq + sumsq

    def flush(self) -> None:
        """Count buffered grid codes (one bincount for many small batches: counts are exact either way)."""
        if self._pending:
            counts = np.bincount(np.concatenate(self._pending))  # up to the highest code seen: often far fewer bins
            if self.codes is None:
                self.codes = np.zeros(GRID_SIZE, np.int64)
            self.codes[: counts.size] += counts
            self._pending, self._pending_n = [], 0

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of both value sets together (shards merge into the one-run result)."""
        self.flush()
        other.flush()

        def add(a, b):
            return b if a is None else a if b is None else a + b

        return TensorStats(
            count=self.count + other.count,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            bins=max(self.bins, other.bins),
            codes=add(self.codes, other.codes),
            channel_sum=add(self.channel_sum, other.channel_sum),
            channel_sumsq=add(self.channel_sumsq, other.channel_sumsq),
            channel_count=self.channel_count + other.channel_count,
            stride=self.stride or other.stride,
        )

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.channel_count, 1)

    def distribution(self) -> tuple[np.ndarray, np.ndarray]:
        """Occupied grid bins as (value, count), ascending by value; values clipped to [min, max]."""
        if self.codes is None:
            raise ValueError("no histogram was collected for this tensor (histogram_bins=0)")
        nonzero = np.flatnonzero(self.codes)
        values = GRID_CENTERS[nonzero]
        keep = np.isfinite(values)
        values, counts = np.clip(values[keep], self.min, self.max), self.codes[nonzero][keep]
        order = np.argsort(values, kind="stable")
        return values[order], counts[order]

    @property
    def histogram(self) -> np.ndarray | None:
        """Counts in ``bins`` uniform bins over [min, max] (see :attr:`edges`)."""
        if self.codes is None:
            return None
        values, counts = self.distribution()
        return np.histogram(values, self.bins, range=(self.min, self.max), weights=counts)[0].astype(np.int64)

    @property
    def edges(self) -> np.ndarray | None:
        return None if self.codes is None else np.linspace(self.min, self.max, self.bins + 1)


def _stride(n: int) -> int:
    """Histogram stride within a sample of ``n`` values: at most HIST_PER_SAMPLE values, coprime
    with ``n`` (so with every inner dimension: the picks walk all channels and positions)."""
    k = -(-n // HIST_PER_SAMPLE)
    while k > 1 and math.gcd(k, n) != 1:
        k += 1
    return k


# --------------------------------------------------------------------------- calibration graph


class _Observer:
    """One session over the model plus, per observed tensor, nodes that reduce it to small results.

    Outputs per tensor (keys of :meth:`run`'s values): ``shape``; ``min``/``max`` (float32
    scalars); ``picked``: each sample's values (``Reshape`` to ``[samples, -1]``) sliced with the
    tensor's stride (a fed input, 1 until :meth:`run` fixes it from the first run's row length);
    ``sums``/``sumsq``: per-channel float64 sums when a channel axis was asked for.
    """

    def __init__(self, model: onnx.ModelProto, names: list[str], axes: Mapping[str, int], squares: set[str]):
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 10:
            raise InputError(f"calibration needs opset >= 10 (strided Slice); the model has opset {opset}")
        make = unique_name_factory(model)
        nodes: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []

        def node(op: str, inputs: list[str], **attrs) -> str:
            out = make(f"calib_{op}")
            nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
            return out

        consts: dict[tuple[int, ...], str] = {}

        def const(values: list[int]) -> str:
            if tuple(values) not in consts:
                name = consts[tuple(values)] = make("calib_const")
                inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
            return consts[tuple(values)]

        def reduce(op: str, x: str, axes: list[int] | None) -> str:
            if axes is None:
                return node(op, [x], keepdims=0)
            if opset >= 18 or (op == "ReduceSum" and opset >= 13):
                return node(op, [x, const(axes)], keepdims=0)
            return node(op, [x], axes=axes, keepdims=0)

        self.rows = make("calib_rows")
        inputs = [helper.make_tensor_value_info(self.rows, TensorProto.INT64, [2])]
        zero, end, one = const([0]), const([INT64_MAX]), const([1])
        self.outputs: dict[str, dict[str, str]] = {}
        self.stride_inputs: dict[str, str] = {}
        floats = {v.name for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)
                  if v.type.tensor_type.elem_type == TensorProto.FLOAT}
        for name in names:
            x = name if name in floats else node("Cast", [name], to=TensorProto.FLOAT)
            out = {"shape": node("Shape", [name]), "min": reduce("ReduceMin", x, None),
                   "max": reduce("ReduceMax", x, None)}
            stride = self.stride_inputs[name] = make("calib_stride")
            inputs.append(helper.make_tensor_value_info(stride, TensorProto.INT64, [1]))
            out["picked"] = node("Slice", [node("Reshape", [x, self.rows]), zero, end, one, stride])
            if name in axes:
                a = axes[name]
                if a >= 0:  # [d0 .. d(a-1), C, rest]
                    y, channel, after = node("Reshape", [x, const([0] * (a + 1) + [-1])]), a, [a + 1]
                else:  # [before, C, d(a+1) .. d(-1)]
                    tail = node("Slice", [out["shape"], const([a]), end])
                    y = node("Reshape", [x, node("Concat", [const([-1]), tail], axis=0)])
                    channel, after = 1, list(range(2, 1 - a))
                before = list(range(channel))
                row_sums = node("Cast", [reduce("ReduceSum", y, after) if after else y], to=TensorProto.DOUBLE)
                out["sums"] = reduce("ReduceSum", row_sums, before) if before else row_sums
                if name in squares:
                    out["sumsq"] = reduce("ReduceSumSquare", node("Cast", [y], to=TensorProto.DOUBLE), before + after)
            self.outputs[name] = out
        self.inputs = [v.name for v in model_inputs(model)]
        graph = model.graph
        sizes = len(graph.node), len(graph.input), len(graph.initializer)
        try:
            graph.node.extend(nodes)
            graph.input.extend(inputs)
            graph.initializer.extend(inits)
            fetched = [o for out in self.outputs.values() for o in out.values()]
            # graph optimizations fuse around the observed values (they keep every consumer) and run
            # faster; priority order runs each reduction right after its tensor is made (the default
            # order leaves many to the end: every observed tensor alive at once, 30 % slower)
            self.session = Session(model, extra_outputs=fetched, optimize=True, priority_order=True)
        finally:
            del graph.node[sizes[0]:]
            del graph.input[sizes[1]:]
            del graph.initializer[sizes[2]:]
        self.strides: dict[str, int] = {}

    def run(self, feed: Mapping[str, np.ndarray], samples: int, kinds: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        """The ``kinds`` of results per tensor for one batch of ``samples`` samples.

        The first run goes with stride 1 (whole rows) and fixes each tensor's stride from its row
        length; its ``picked`` rows are then strided here, as later runs stride them in the graph.
        """
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise InputError(f"calibration: the feeds have no array for graph input '{missing[0]}'")
        first = not self.strides
        if first and "picked" not in kinds:
            kinds = (*kinds, "picked")
        run_feed = {**feed, self.rows: np.array([samples, -1], np.int64)}
        run_feed.update((self.stride_inputs[n], np.array([self.strides.get(n, 1)], np.int64)) for n in self.outputs)
        names = [(t, k, out[k]) for t, out in self.outputs.items() for k in kinds if k in out]
        values = self.session.run(run_feed, [o for _, _, o in names])
        results: dict[str, dict[str, np.ndarray]] = {t: {} for t in self.outputs}
        for t, k, o in names:
            results[t][k] = values[o]
        if first:
            for t, r in results.items():
                self.strides[t] = _stride(r["picked"].shape[1])
                r["picked"] = r["picked"][:, :: self.strides[t]]
        return results

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------------- batching


def _batched(feeds: Iterable[Mapping[str, np.ndarray]], size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(samples, feed): ``size`` consecutive sample feeds joined along the batch axis (FeedSet: no copies)."""
    if size <= 1:
        yield from ((1, {k: np.asarray(v) for k, v in f.items()}) for f in feeds)  # 0-d samples come as numpy scalars
        return
    if isinstance(feeds, FeedSet):
        yield from ((min(size, len(feeds) - start), feed)
                    for start, feed in zip(range(0, len(feeds), size), feeds.batches(size)))
        return
    group: list[Mapping[str, np.ndarray]] = []
    for feed in feeds:
        group.append(feed)
        if len(group) == size:
            yield size, {k: np.concatenate([np.asarray(g[k]) for g in group]) for k in group[0]}
            group = []
    if group:
        yield len(group), {k: np.concatenate([np.asarray(g[k]) for g in group]) for k in group[0]}


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    """Every input's first axis is symbolic (or unknown): samples can be joined along it."""
    dims = [input_dims(v) for v in model_inputs(model)]
    return all(d is None or (d and not (isinstance(d[0], int) and d[0] > 0)) for d in dims)


def _same_rows(single: Mapping[str, dict], joined: Mapping[str, dict], size: int) -> bool:
    """Every tensor of the joined run is ``size`` samples stacked along the first axis, and the
    first sample's subsample is the single run's (batch-major, no mixing of samples)."""
    for name, a in single.items():
        b = joined[name]
        shape = a["shape"]
        if shape.size == 0 or b["shape"].tolist() != [shape[0] * size, *shape[1:].tolist()]:
            return False
        x, y = a["picked"][0], b["picked"][0]
        scale = float(np.abs(x).max(initial=0.0))
        if x.shape != y.shape or not np.allclose(y, x, rtol=1e-3, atol=1e-5 * max(scale, 1.0)):
            return False
    return True


def _runs(observer: _Observer, model, feeds, batch_size: int, kinds: tuple[str, ...]):
    """(samples, results) per run: ``batch_size`` samples a run, or automatic (0).

    Automatic: a FeedSet of a model with a dynamic batch axis runs sample 0 alone, then a joined
    batch (``MAX_BATCH`` samples, fewer when a sample's largest observed tensor is big: never
    depending on how many samples there are, so neither does peak memory); if the joined batch reproduces sample 0 the rest runs joined too, otherwise
    one sample a run. The probe costs one extra sample run.
    """
    if batch_size or not isinstance(feeds, FeedSet) or len(feeds) < 2 or not _dynamic_batch(model):
        for samples, feed in _batched(feeds, batch_size or 1):
            yield samples, observer.run(feed, samples, kinds)
        return
    probe = tuple(dict.fromkeys((*kinds, "shape", "picked")))
    first = next(iter(feeds))
    single = observer.run(first, 1, probe)
    largest = max(int(np.prod(r["shape"])) for r in single.values())  # onnxruntime frees each value after use
    size = min(MAX_BATCH, max(1, BATCH_VALUES // max(largest, 1)))
    start = 1
    if size > 1:
        head, n = next(feeds.batches(size)), min(size, len(feeds))
        try:
            joined = observer.run(head, n, probe)
        except InputError:  # a value that cannot be split per sample
            joined = None
        if joined is not None and _same_rows(single, joined, n):
            yield n, joined
            start = n
        else:
            size = 1
    if start == 1:
        yield 1, single
    rest = FeedSet({k: v[start:] for k, v in feeds.arrays.items()}, feeds.origin)
    for samples, feed in _batched(rest, size):
        yield samples, observer.run(feed, samples, kinds)


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    tensors: Iterable[str],
    *,
    histogram_bins: int = 0,
    sumsq_axes: Mapping[str, int] | None = None,
    mean_axes: Mapping[str, int] | None = None,
    batch_size: int = 0,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """Statistics of the named values (graph inputs too) over all feeds; each sample runs once.

    ``histogram_bins > 0`` keeps a grid histogram (one pass, see the module notes) exposed as
    that many uniform bins; ``sumsq_axes`` maps a value to its channel axis for per-channel
    sums and sums of squares, ``mean_axes`` for per-channel sums only. ``batch_size`` samples run
    joined (0: automatic, see :func:`_runs`; a joined batch must keep samples apart along the
    first axis); the statistics do not depend on it.
    """
    names = list(dict.fromkeys(tensors))
    axes = {**dict(mean_axes or {}), **dict(sumsq_axes or {})}
    known = defined_names(model.graph)
    unknown = [n for n in [*names, *axes] if n not in known]
    if unknown:
        raise InputError(f"calibration: the model has no value named {', '.join(map(repr, unknown[:5]))}")
    names.extend(n for n in axes if n not in names)
    stats = {n: TensorStats(bins=histogram_bins) for n in names}
    kinds = ("min", "max", "shape", "sums", "sumsq", *(("picked",) if histogram_bins else ()))
    length = len(feeds) if hasattr(feeds, "__len__") else None
    seen = 0
    if not names:
        seen = sum(samples for samples, _ in _batched(feeds, 1))
    else:
        observer = _Observer(model, names, axes, set(sumsq_axes or ()))
        try:
            runs = _runs(observer, model, feeds, batch_size, kinds)
            with _progress(length if progress else None) as bar:
                for samples, results in runs:
                    _fold(stats, results, histogram_bins > 0, observer.strides)
                    seen += samples
                    if bar is not None:
                        bar.update(samples)
        finally:
            observer.close()
    for st in stats.values():
        st.flush()
    if not seen:
        raise InputError("calibration: no samples")
    return stats


def _progress(length: int | None):
    """A click progress bar over ``length`` samples, or no bar (None)."""
    if not length:
        return contextlib.nullcontext()
    import click

    return click.progressbar(length=length, label="calibrating", file=None)


def _fold(stats: dict[str, TensorStats], results: Mapping[str, dict], histogram: bool, strides) -> None:
    """Fold one run's reductions into the statistics (the run's arrays are dropped after)."""
    for name, st in stats.items():
        r = results[name]
        st.stride = strides[name]
        st.add(int(np.prod(r["shape"])), r["min"], r["max"], r["picked"] if histogram else None,
               r.get("sums"), r.get("sumsq"))


# --------------------------------------------------------------------------- cache files

_FIELDS = ("count", "min", "max", "bins", "channel_sum", "channel_sumsq", "channel_count")


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of every graph's nodes and interface: statistics are tied to the model they came from."""
    digest = hashlib.sha256()
    for g in model_graphs(model):
        for part in (*g.node, *g.input, *g.output):
            digest.update(part.SerializeToString(deterministic=True))
        for t in g.initializer:
            digest.update(t.name.encode())
            digest.update(t.raw_data[:4096])
    return digest.hexdigest()


def save_stats(path: str | Path, stats: Mapping[str, TensorStats], fingerprint: str = "") -> None:
    """Write statistics to an ``.npz`` (no pickle); histograms are stored sparsely."""
    arrays: dict[str, np.ndarray] = {
        "names": np.array(list(stats), dtype=str),
        "fingerprint": np.array(fingerprint),
    }
    for i, st in enumerate(stats.values()):
        st.flush()
        for f in _FIELDS:
            value = getattr(st, f)
            if value is not None:
                arrays[f"{i}.{f}"] = np.asarray(value)
        if st.codes is not None:
            nonzero = np.flatnonzero(st.codes)
            arrays[f"{i}.codes_at"], arrays[f"{i}.codes_n"] = nonzero, st.codes[nonzero]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_stats(path: str | Path) -> tuple[dict[str, TensorStats], str]:
    """Statistics and the fingerprint saved with them."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        stats = {}
        for i, name in enumerate(data["names"].tolist()):
            st = TensorStats()
            for f in _FIELDS:
                if f"{i}.{f}" in data:
                    value = data[f"{i}.{f}"]
                    setattr(st, f, value if value.ndim else value.item())
            if f"{i}.codes_at" in data:
                st.codes = np.zeros(GRID_SIZE, dtype=np.int64)
                st.codes[data[f"{i}.codes_at"]] = data[f"{i}.codes_n"]
            stats[name] = st
        return stats, str(data["fingerprint"])
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a calibration cache ({exc.__class__.__name__}: {exc})") from None
