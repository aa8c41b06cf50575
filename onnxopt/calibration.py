"""Streaming calibration: each batch runs through onnxruntime once and is reduced at once.

Statistics are mergeable (shards merge into the same result as one run) and keep nothing
per sample, so memory does not grow with the number of samples (histograms only by the grid
bins that new values occupy, at most the grid). A run's fetched values are dropped once folded,
before the next run starts: held, they made onnxruntime allocate fresh output memory run after run.

Histograms use a *fixed, data-independent grid* instead of a min/max pass followed by a
fixed-range histogram pass: a value's bin is the top 16 bits of its float32 pattern (sign,
exponent, 7 mantissa bits: the bfloat16 grid, 0.8 % relative resolution). Counting is exact
and keeps only occupied bins (a few thousand of the 65536: sorted codes and their counts), so
the histogram is identical for any batch size, chunking or order, and one pass suffices
(calibration costs one inference pass, not two). Range choices read it as (value, count) pairs
(:meth:`TensorStats.distribution`), equal to a direct histogram within the grid's rounding.
Tensors bigger than
``HIST_PER_SAMPLE`` values per sample are histogrammed on a fixed systematic subsample of each
sample (same stride for every sample, so still independent of batching); min/max and channel
sums always see every value. Counting every value of a big activation costs more than the
inference that produced it.

By default samples of a :class:`FeedSet` run in joined batches when the model's batch axis is
dynamic and a probe shows that joining changes no sample's values; per-run overhead (onnxruntime
call, one numpy call per statistic and tensor) then falls on many samples at once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .data import model_inputs
from .errors import InputError
from .graph import defined_names, model_graphs
from .tensors import external_info, is_external, tensor_to_array
from .validate import Session, joined_runs

GRID_SIZE = 1 << 16
FLUSH_AT = 1 << 15  # grid codes buffered per tensor before they are counted: a fixed 64 KiB, whatever the sample
#   count (counting is a radix sort, O(codes), so a fuller buffer only saves merges of the sparse counts)
HIST_PER_SAMPLE = 512  # at most this many values per tensor and sample go into the histogram


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

    ``count`` values in all; ``codes`` are the occupied bfloat16 grid bins (ascending uint16) and
    ``code_counts`` their values (when histograms are on; every ``stride``-th value of each sample),
    sparse: a dense int64 grid would be 512 KiB per tensor; ``channel_sum`` (and ``channel_sumsq`` when
    asked for) sum values (and squares) per channel over all other axes (``channel_count``
    values per channel), when a channel axis was asked for.
    """

    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    bins: int = 0
    codes: np.ndarray | None = None
    code_counts: np.ndarray | None = None
    channel_sum: np.ndarray | None = None
    channel_sumsq: np.ndarray | None = None
    channel_count: int = 0
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    stride: int = 0
    _pending: np.ndarray | None = field(default=None, repr=False, compare=False)  # FLUSH_AT codes, fixed size
    _pending_n: int = field(default=0, repr=False, compare=False)

    def update(self, values: np.ndarray, channel_axis: int | None = None, *, samples: int = 1,
               squares: bool = True) -> None:
        """Fold one batch of ``samples`` samples in (vectorised; nothing of the batch is kept).

        ``squares=False`` skips the per-channel sums of squares (a mean needs only sums).
        """
        x = np.ascontiguousarray(values, dtype=np.float32)  # no copy for a fetched float32 value
        if x.size == 0:
            return
        self.count += x.size
        # +0.0 turns -0.0 into 0.0, so the result does not depend on which zero came first
        self.min = min(self.min, float(x.min()) + 0.0)
        self.max = max(self.max, float(x.max()) + 0.0)
        if self.bins:
            rows = x.reshape(samples if x.size % samples == 0 else 1, -1)
            self.stride = self.stride or _stride(rows.shape[1])
            if np.little_endian:  # a value's grid code is its high 16-bit half (the second uint16): a view
                self._buffer(rows.view(np.uint16)[:, 1:: 2 * self.stride])
            else:
                self._buffer((rows[:, :: self.stride].view(np.uint32) >> 16).astype(np.uint16))
        if channel_axis is not None:
            # (before, channel, after) without a copy; float32 sums per row, float64 across rows
            x3 = x.reshape(math.prod(x.shape[:channel_axis]), x.shape[channel_axis], -1)
            # row sums as a matrix-vector product with ones (BLAS, per sample the same call whatever the
            # batch): a third of numpy's reduction along a short last axis; a single column needs no sum
            rows = x3[:, :, 0] if x3.shape[2] == 1 else x3 @ np.ones(x3.shape[2], np.float32)
            s = rows.sum(axis=0, dtype=np.float64)
            self.channel_sum = s if self.channel_sum is None else self.channel_sum + s
            if squares:
                sq = np.einsum("pcq,pcq->c", x3, x3, dtype=np.float64)
                self.channel_sumsq = sq if self.channel_sumsq is None else self.channel_sumsq + sq
            self.channel_count += x3.shape[0] * x3.shape[2]
            low, high = x3.min(axis=(0, 2)).astype(np.float64), x3.max(axis=(0, 2)).astype(np.float64)
            self.channel_min = low if self.channel_min is None else np.minimum(self.channel_min, low)
            self.channel_max = high if self.channel_max is None else np.maximum(self.channel_max, high)

    def _buffer(self, codes: np.ndarray) -> None:
        """Copy uint16 grid codes (rows of a 2-D view) into the fixed buffer, counting it first when
        they would not fit."""
        n = codes.size
        if self._pending_n + n > FLUSH_AT:
            self._count_pending()
            if n > FLUSH_AT:  # a run bigger than the buffer is counted directly (its values are held anyway)
                self._count(codes.reshape(-1))
                return
        if self._pending is None:
            self._pending = np.empty(FLUSH_AT, np.uint16)
        self._pending[self._pending_n: self._pending_n + n].reshape(codes.shape)[...] = codes
        self._pending_n += n

    def _count_pending(self) -> None:
        if self._pending_n:
            self._count(self._pending[: self._pending_n])
            self._pending_n = 0

    def _count(self, codes: np.ndarray) -> None:
        """Add uint16 grid codes to the sparse counts: a radix sort and run lengths, O(codes), no dense grid."""
        ordered = np.sort(codes, kind="stable")  # radix sort for 16-bit integers
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        counts = np.diff(np.r_[starts, ordered.size]).astype(np.int64)
        self.codes, self.code_counts = _add_counts(self.codes, self.code_counts, ordered[starts], counts)

    def flush(self) -> None:
        """Count buffered grid codes and free the buffer (counts are exact however the codes were split)."""
        self._count_pending()
        self._pending = None

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of both value sets together (shards merge into the one-run result)."""
        self.flush()
        other.flush()

        def add(a, b, combine=np.add):
            return b if a is None else a if b is None else combine(a, b)

        codes, code_counts = _add_counts(self.codes, self.code_counts, other.codes, other.code_counts)
        return TensorStats(
            count=self.count + other.count,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            bins=max(self.bins, other.bins),
            codes=codes,
            code_counts=code_counts,
            channel_sum=add(self.channel_sum, other.channel_sum),
            channel_sumsq=add(self.channel_sumsq, other.channel_sumsq),
            channel_count=self.channel_count + other.channel_count,
            channel_min=add(self.channel_min, other.channel_min, np.minimum),
            channel_max=add(self.channel_max, other.channel_max, np.maximum),
            stride=self.stride or other.stride,
        )

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.channel_count, 1)

    @property
    def channel_mean_square(self) -> np.ndarray | None:
        return None if self.channel_sumsq is None else self.channel_sumsq / max(self.channel_count, 1)

    def distribution(self) -> tuple[np.ndarray, np.ndarray]:
        """Occupied grid bins as (value, count), ascending by value; values clipped to [min, max]."""
        if self.codes is None:
            raise ValueError("no histogram was collected for this tensor (histogram_bins=0)")
        values = GRID_CENTERS[self.codes]
        keep = np.isfinite(values)
        values, counts = np.clip(values[keep], self.min, self.max), self.code_counts[keep]
        order = np.argsort(values, kind="stable")
        return values[order], counts[order]


def _add_counts(codes_a, counts_a, codes_b, counts_b) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Sum of two sparse grid histograms (sorted uint16 codes with counts; None: empty)."""
    if codes_a is None or codes_b is None:
        return (codes_b, counts_b) if codes_a is None else (codes_a, counts_a)
    codes = np.concatenate([codes_a, codes_b])
    order = np.argsort(codes, kind="stable")
    codes, counts = codes[order], np.concatenate([counts_a, counts_b]).astype(np.int64)[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return codes[starts], np.add.reduceat(counts, starts)


def _stride(n: int) -> int:
    """Histogram stride within a sample of ``n`` values: at most HIST_PER_SAMPLE values, coprime
    with ``n`` (so with every inner dimension: the picks walk all channels and positions)."""
    k = -(-n // HIST_PER_SAMPLE)
    while k > 1 and math.gcd(k, n) != 1:
        k += 1
    return k


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
    """Statistics of the named values over all feeds; each sample runs once.

    ``histogram_bins > 0`` keeps a grid histogram (one pass, see the module notes) exposed as
    that many uniform bins; ``sumsq_axes`` maps a value to its channel axis for per-channel
    sums and sums of squares, ``mean_axes`` for per-channel sums only. Graph inputs are read from
    the feeds directly. ``batch_size`` samples run joined (0: automatic, see :func:`onnxopt.validate.joined_runs`);
    the statistics do not depend on it.
    """
    names = list(dict.fromkeys(tensors))
    axes = {**dict(mean_axes or {}), **dict(sumsq_axes or {})}
    squares = set(sumsq_axes or ())
    known = defined_names(model.graph)
    unknown = [n for n in [*names, *axes] if n not in known]
    if unknown:
        raise InputError(f"calibration: the model has no value named {', '.join(map(repr, unknown[:5]))}")
    names.extend(n for n in axes if n not in names)
    inputs = {v.name for v in model_inputs(model)}  # initializer-backed inputs are fetched like values
    fetched = [n for n in names if n not in inputs]
    stats = {n: TensorStats(bins=histogram_bins) for n in names}
    length = len(feeds) if hasattr(feeds, "__len__") else None
    seen = 0
    # graph optimizations keep every fetched value (fusions stop at graph outputs) and run faster
    with Session(model, extra_outputs=fetched, optimize=True) as session:
        folded = _folded(stats, joined_runs(session, model, feeds, fetched, batch_size), axes, squares)
        if progress and length:
            import click

            with click.progressbar(length=length, label="calibrating", file=None) as bar:
                for samples in folded:
                    seen += samples
                    bar.update(samples)
        else:
            seen = sum(folded)
    for st in stats.values():
        st.flush()
    if not seen:
        raise InputError("calibration: no samples")
    return stats


def _folded(stats, runs, axes, squares) -> Iterator[int]:
    """Fold each run's values into the statistics as it comes; the number of samples it held."""
    for samples, feed, values in runs:
        _fold(stats, samples, feed, values, axes, squares)
        del values  # not held through the next run: onnxruntime's output memory is reused, not grown
        yield samples


def _fold(stats, samples: int, feed, values, axes, squares) -> None:
    """Fold one run's values into the statistics."""
    for name, st in stats.items():
        value = values[name] if name in values else feed.get(name)
        if value is None:
            raise InputError(f"calibration: the feeds have no array for graph input '{name}'")
        axis = axes.get(name)
        st.update(value, None if axis is None else axis % np.ndim(value), samples=samples, squares=name in squares)


# --------------------------------------------------------------------------- cache files

_FIELDS = ("count", "min", "max", "bins", "channel_sum", "channel_sumsq", "channel_count", "channel_min",
           "channel_max")


def model_fingerprint(model: onnx.ModelProto) -> str:
    """A hash of every graph's nodes, interface and initializers: statistics are tied to the model they came from.

    Initializers count by name, type, shape and values: inline values are hashed whole (raw or typed
    fields), external ones by where their bytes are (a rewritten external tensor gets a new location
    or offset), so statistics of a model before prune or zero-rows do not pass for the result's.
    """
    digest = hashlib.sha256()
    for g in model_graphs(model):
        for part in (*g.node, *g.input, *g.output, *g.sparse_initializer):
            digest.update(part.SerializeToString(deterministic=True))
        for t in g.initializer:
            digest.update(f"{t.name}\0{t.data_type}\0{list(t.dims)}\0".encode())
            if is_external(t):
                info = external_info(t)
                digest.update(repr([(k, info.get(k, "")) for k in ("location", "offset", "length")]).encode())
            elif t.raw_data:
                digest.update(t.raw_data)
            elif t.data_type == onnx.TensorProto.STRING:
                digest.update(b"\0".join(t.string_data))
            else:  # typed fields (float_data, int64_data, ...)
                digest.update(np.ascontiguousarray(tensor_to_array(t)).tobytes())
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
            arrays[f"{i}.codes_at"], arrays[f"{i}.codes_n"] = st.codes, st.code_counts
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
            if f"{i}.codes_at" in data:  # earlier caches hold int64 codes
                st.codes, st.code_counts = data[f"{i}.codes_at"].astype(np.uint16), data[f"{i}.codes_n"].astype(np.int64)
            stats[name] = st
        return stats, str(data["fingerprint"])
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a calibration cache ({exc.__class__.__name__}: {exc})") from None
