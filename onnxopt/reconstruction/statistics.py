"""Per-layer input statistics streamed from calibration data: ``XᵀX`` (and ``XᵀY`` against a target).

A layer's rows are its inputs as the weight sees them: a MatMul / Gemm reads rows of its data
input (all leading axes flattened); a Conv reads the unfolded patches of its input (im2col), one
row per output position, split by group (a depthwise Conv is ``C`` groups of ``kernel`` inputs).
Feature order is the canonical weight order ``(kernel..., in)`` of :mod:`onnxopt.passes.weights`,
so a group's weight as a MatMul is ``canonical[outs of group].reshape(outs, -1).T``.

Sums are float64, mergeable, and never hold rows: a batch is unfolded in chunks of at most
``CHUNK_BYTES`` so a big feature map never exists unfolded in memory at once. A grouped 2-D Conv
with few inputs per group (depthwise) is not unfolded at all: its sums come from products of the
input with shifted copies of itself (:func:`_shifted_sums`), which reads each value once per lag
instead of copying it once per kernel offset and multiplying every pair of offsets per row.

Beside the sums, two scalars per group (``noise=True``) measure their sampling noise (how much ``XᵀX``'s
off-diagonal would move on other calibration data of the same kind): over rows, and over samples
(a sample's rows, e.g. the tokens of one sequence, are not independent of each other).
:meth:`LayerStatistics.shrinkage` turns them into how far ``XᵀX`` should be shrunk toward its
diagonal: a solver fitted to the off-diagonal noise of few rows (fewer than the inputs: a
rank-deficient ``XᵀX``) over-fits the calibration data and loses on any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

CHUNK_BYTES = 32 << 20  # unfolded rows per chunk (float32)
SUM_BLOCK = 256  # rows summed in float32 before the float64 total (:func:`_row_sums`)
DIRECT_CHANNELS = 4  # grouped 2-D Conv: statistics from shifted products up to this many channels per group


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@dataclass(frozen=True)
class LayerGeometry:
    """How a layer's data input becomes rows: ``groups`` blocks of ``inputs`` features, ``outputs`` per group.

    ``data_axis`` is the feature axis of a MatMul / Gemm input; Conv layers carry kernel, strides,
    dilations and pads (begin..., end...) of their spatial axes.
    """

    groups: int
    inputs: int
    outputs: int
    data_axis: int = -1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def direct(self) -> bool:
        """Whether the statistics come from shifted products of the input instead of unfolded rows: a grouped
        2-D Conv with few inputs per group (a depthwise 5x5 reads each input value 25 times; its gram is
        41 shifted products of the input, not 25 copies times a 26x26 product per row). Measured on one
        thread: 2.5x faster for depthwise 3x3, even at 4 channels per group, slower beyond."""
        return self.groups > 1 and len(self.kernel) == 2 and self.inputs <= DIRECT_CHANNELS * math.prod(self.kernel)

    @classmethod
    def linear(cls, inputs: int, outputs: int, data_axis: int = -1) -> LayerGeometry:
        return cls(1, inputs, outputs, data_axis)

    @classmethod
    def conv(cls, node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> LayerGeometry:
        """From a Conv node and its weight ``(M, C/group, k...)``."""
        kernel = tuple(int(k) for k in weight_shape[2:])
        spatial = len(kernel)
        groups = int(_attribute(node, "group", 1))
        auto_pad = _attribute(node, "auto_pad", b"NOTSET")
        return cls(groups, int(weight_shape[1]) * math.prod(kernel), int(weight_shape[0]) // groups, 1, kernel,
                   tuple(_attribute(node, "strides", [1] * spatial)), tuple(_attribute(node, "dilations", [1] * spatial)),
                   tuple(_attribute(node, "pads", [0] * 2 * spatial)),
                   (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) or "NOTSET")

    def _pads(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        n = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small = total // 2
                pads.append((small, total - small) if self.auto_pad == "SAME_UPPER" else (total - small, small))
            return pads
        if self.auto_pad == "VALID":
            return [(0, 0)] * n
        return list(zip(self.pads[:n], self.pads[n:]))

    def columns(self, x: np.ndarray | list[np.ndarray]) -> Iterator[np.ndarray]:
        """The input's rows, transposed: float32 ``(groups, inputs, R)`` in chunks of bounded size.

        Transposed because a Conv's unfolding (im2col) then writes each kernel offset's values
        contiguously; BLAS multiplies the transpose at no cost. A Conv's input may be a list of batches
        (consecutive ones of a run, :func:`_joined`): each chunk's samples are unfolded straight from
        them, padding as zeros, with no joined or padded copy of the input first (the same rows).
        """
        if not self.is_conv:
            flat = np.moveaxis(np.asarray(x), self.data_axis, -1).reshape(-1, self.inputs)
            step = max(1, CHUNK_BYTES // (4 * self.inputs))
            for start in range(0, len(flat), step):
                yield flat[start: start + step].astype(np.float32, copy=False).T[None]
            return
        batches = [np.asarray(b, dtype=np.float32) for b in (x if isinstance(x, list) else [x])]
        groups, spatial = self.groups, batches[0].shape[2:]
        pads = self._pads(spatial)
        out = tuple((size + a + b - (k - 1) * d - 1) // s + 1
                    for size, (a, b), k, d, s in zip(spatial, pads, self.kernel, self.dilations, self.strides))
        step = CHUNK_BYTES // max(4 * self.inputs * groups * math.prod(out), 1)
        if not step:  # a sample's rows exceed a chunk: runs of its output lines, from the padded input
            yield from self._line_columns(np.concatenate(batches) if len(batches) > 1 else batches[0], pads)
            return
        spans = {offset: [_window(o * d, s, m, a, size) for o, d, s, m, (a, _), size
                          in zip(offset, self.dilations, self.strides, out, pads, spatial)]
                 for offset in np.ndindex(*self.kernel)}
        total = sum(len(b) for b in batches)
        for start in range(0, total, step):
            n = min(step, total - start)
            cols = np.empty((groups, *self.kernel, batches[0].shape[1] // groups, n, *out), np.float32)
            for offset, windows in spans.items():  # one strided copy per kernel offset and batch
                block = cols[(slice(None), *offset)]
                _zero_outside(block, [written for _, written in windows])
                if any(written.stop <= written.start for _, written in windows):
                    continue
                at = 0
                for part in _samples(batches, start, start + n):
                    source = part[(slice(None), slice(None), *(read for read, _ in windows))]
                    block[(slice(None), slice(None), slice(at, at + len(part)), *(w for _, w in windows))] = \
                        np.moveaxis(source.reshape(len(part), groups, -1, *source.shape[2:]), 0, 2)
                    at += len(part)
            yield cols.reshape(groups, self.inputs, -1)

    def _line_columns(self, x: np.ndarray, pads: list[tuple[int, int]]) -> Iterator[np.ndarray]:
        """:meth:`columns` of samples too big for one chunk: runs of output lines of the padded input."""
        groups = self.groups
        padded = np.pad(x, [(0, 0), (0, 0), *pads]) if any(a or b for a, b in pads) else x
        reach = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        out = tuple((size - r) // s + 1 for size, r, s in zip(padded.shape[2:], reach, self.strides))
        for part in _chunks(padded, out, self.inputs * groups, self.strides[0], reach[0]):
            n = len(part)
            lines = [(size - r) // s + 1 for size, r, s in zip(part.shape[2:], reach, self.strides)]
            cols = np.empty((groups, *self.kernel, part.shape[1] // groups, n, *lines), np.float32)
            for offset in np.ndindex(*self.kernel):  # one contiguous strided copy per kernel offset
                source = part[(slice(None), slice(None), *(slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, s, m
                                                           in zip(offset, self.dilations, self.strides, lines)))]
                cols[(slice(None), *offset)] = np.moveaxis(source.reshape(n, groups, -1, *lines), 0, 2)
            yield cols.reshape(groups, self.inputs, -1)

    def targets(self, y: np.ndarray | list[np.ndarray]) -> Iterator[np.ndarray]:
        """The layer's output (or its teacher's) as rows ``(groups, R, outputs)``, chunked like :meth:`columns`
        (a Conv's output may be a list of batches, as its input)."""
        if not self.is_conv:
            flat = np.asarray(y).reshape(-1, self.outputs)
            step = max(1, CHUNK_BYTES // (4 * self.inputs))
            for start in range(0, len(flat), step):
                yield flat[start: start + step].astype(np.float32, copy=False)[None]
            return
        batches = [np.asarray(b) for b in (y if isinstance(y, list) else [y])]
        positions = batches[0].shape[2:]
        step = CHUNK_BYTES // max(4 * self.inputs * self.groups * math.prod(positions), 1)
        if not step:
            whole = np.concatenate(batches) if len(batches) > 1 else batches[0]
            for part in _chunks(whole, positions, self.inputs * self.groups):
                part = part.reshape(len(part), self.groups, self.outputs, -1)
                yield np.moveaxis(part, 1, 0).swapaxes(2, 3).reshape(self.groups, -1, self.outputs).astype(
                    np.float32, copy=False)
            return
        total = sum(len(b) for b in batches)
        for start in range(0, total, step):
            n = min(step, total - start)
            rows = np.empty((self.groups, n, math.prod(positions), self.outputs), np.float32)
            at = 0
            for part in _samples(batches, start, start + n):  # one transposing copy per batch
                rows[:, at: at + len(part)] = part.reshape(len(part), self.groups, self.outputs, -1).transpose(
                    1, 0, 3, 2)
                at += len(part)
            yield rows.reshape(self.groups, -1, self.outputs)

    def work(self, batches: list[np.ndarray]) -> float:
        """Multiply-adds of the layer's gram over these input batches: what decides BLAS threads."""
        rows = sum(max(self.input_rows(b), 0) for b in batches)
        return float(rows) * self.inputs * self.inputs * self.groups

    def output_rows(self, y: np.ndarray | list[np.ndarray]) -> int:
        """How many rows an output holds (to check a target against the input's rows)."""
        if isinstance(y, list):
            return sum(self.output_rows(b) for b in y)
        y = np.asarray(y)
        return y.size // (self.outputs * self.groups)

    def input_rows(self, x: np.ndarray | list[np.ndarray]) -> int:
        if isinstance(x, list):
            rows = [self.input_rows(b) for b in x]
            return -1 if min(rows) < 0 else sum(rows)
        x = np.asarray(x)
        if not self.is_conv:
            return x.size // self.inputs if x.ndim and x.shape[self.data_axis] == self.inputs else -1
        pads = self._pads(x.shape[2:])
        out = [(size + a + b - (k - 1) * d - 1) // s + 1
               for size, (a, b), k, d, s in zip(x.shape[2:], pads, self.kernel, self.dilations, self.strides)]
        return x.shape[0] * math.prod(out)


def _row_sums(values: np.ndarray, axis: int) -> np.ndarray:
    """float64 sums of a 3-D float32 array along ``axis`` (-1 or -2, as laid out: rows of a linear layer are
    the transposed view): runs of ``SUM_BLOCK`` summed in float32 by BLAS against ones, the runs in float64.
    Within 1e-7 of a float64 sum (each run rounds like ``SUM_BLOCK`` terms) at a quarter of its time: numpy
    converts every value to float64 first (a 144-input layer over 262k rows: 35 ms against the gram's 78)."""
    if values.strides[-1] != values.itemsize and values.strides[-2] == values.itemsize:
        return _row_sums(np.swapaxes(values, -1, -2), -1 if axis % 3 == 1 else -2)
    length = values.shape[axis]
    whole = length - length % SUM_BLOCK
    ones = np.ones(SUM_BLOCK, values.dtype)
    if axis % 3 == 2:
        runs = values[..., :whole].reshape(*values.shape[:-1], -1, SUM_BLOCK) @ ones
        tail = values[..., whole:]
    else:
        runs = ones @ values[:, :whole].reshape(len(values), -1, SUM_BLOCK, values.shape[-1])
        tail = values[:, whole:]
    return runs.sum(axis=axis, dtype=np.float64) + tail.sum(axis=axis, dtype=np.float64)


def _square_sum(values: np.ndarray) -> float:
    """``Σ v²`` of a contiguous float32 chunk (BLAS dot: blocked sums, accurate to ~1e-6 of the total)."""
    flat = values.reshape(-1)
    return float(np.dot(flat, flat))


def _off_diagonal_square(grams: np.ndarray, feature_squares: np.ndarray) -> float:
    """``Σ_{i≠j} (XᵀX)²_ij`` summed over samples, from each sample's grams (``XᵀX`` or ``XXᵀ``: the same
    Frobenius norm) and its ``diag(XᵀX)`` (``feature_squares``, ``(samples, K)``)."""
    flat = grams.reshape(-1)
    return float(np.dot(flat, flat)) - float(np.einsum("sk,sk->", feature_squares, feature_squares, dtype=np.float64))


def sample_noise(x: np.ndarray) -> float:
    """``Σ_s Σ_{i≠j} (X_sᵀX_s)²_ij`` over the samples ``x (S, T, K)`` (T rows each), in bounded chunks:
    through the smaller of the ``T x T`` and ``K x K`` grams."""
    samples, rows, k = x.shape
    small = min(rows, k)
    step = max(1, CHUNK_BYTES // (4 * (rows * k + small * small)))
    total = 0.0
    for start in range(0, samples, step):
        part = np.asarray(x[start: start + step], dtype=np.float32)
        grams = part @ np.swapaxes(part, 1, 2) if rows <= k else np.swapaxes(part, 1, 2) @ part
        total += _off_diagonal_square(grams, (part * part).sum(axis=1, dtype=np.float64))
    return total


def _chunks(array: np.ndarray, positions: tuple[int, ...], features: int, stride: int = 1,
            reach: int = 1) -> Iterator[np.ndarray]:
    """Slices of a ``(B, C, spatial...)`` array whose ``positions x features`` float32 rows fit
    ``CHUNK_BYTES``: several samples at once when they fit, else runs of output lines of one sample
    (of a padded Conv input: the input lines those outputs read, ``stride`` apart, ``reach`` high).
    A Conv's input and its targets (``stride = reach = 1``) get the same chunks: their rows line up."""
    per_sample = 4 * features * math.prod(positions)
    if per_sample <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // max(per_sample, 1))
        for b in range(0, len(array), step):
            yield array[b: b + step]
        return
    lines = max(1, CHUNK_BYTES // (per_sample // positions[0]))
    for b in range(len(array)):
        for start in range(0, positions[0], lines):
            stop = min(start + lines, positions[0])
            yield array[b: b + 1, :, start * stride: (stop - 1) * stride + reach]


def _joined(geometry: LayerGeometry, xs: list[np.ndarray], others: list[np.ndarray | None]
            ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(x, other)`` batches, consecutive ones joined along the batch axis up to ``CHUNK_BYTES`` of ``x``
    (``others``: arrays that line up with them, or None); for an unfolded Conv, lists of the batches
    instead of their concatenation (:meth:`LayerGeometry.columns` reads them where they are)."""
    x_axis = 1 if not geometry.is_conv and np.ndim(xs[0]) > 1 and geometry.data_axis % np.ndim(xs[0]) == 0 else 0
    start = 0
    while start < len(xs):
        stop, size = start + 1, np.size(xs[start])
        while stop < len(xs) and 4 * (size + np.size(xs[stop])) <= CHUNK_BYTES and np.ndim(xs[stop]) > 0 \
                and np.shape(xs[stop])[1 - x_axis:] == np.shape(xs[start])[1 - x_axis:] and x_axis == 0:
            size += np.size(xs[stop])
            stop += 1
        if geometry.is_conv and not geometry.direct:  # unfolded straight from the batches (LayerGeometry.columns)
            yield xs[start:stop], (None if others[start] is None else others[start:stop])
        else:
            x = xs[start] if stop == start + 1 else np.concatenate(xs[start:stop])
            other = others[start] if stop == start + 1 or others[start] is None else np.concatenate(others[start:stop])
            yield x, other
        start = stop


def _samples(batches: list[np.ndarray], start: int, stop: int) -> Iterator[np.ndarray]:
    """Samples ``start .. stop`` of the batches joined along axis 0, as views of the batches."""
    for batch in batches:
        if start < len(batch) and stop > 0:
            yield batch[max(start, 0): min(stop, len(batch))]
        start, stop = start - len(batch), stop - len(batch)


def _zero_outside(block: np.ndarray, written: list[slice]) -> None:
    """Zero a ``(g, C/g, n, *out)`` block outside the output positions a kernel offset reads from the
    input (per spatial axis ``written``): there it reads padding."""
    for axis, span in enumerate(written, start=3):
        size = block.shape[axis]
        for region in (slice(0, min(span.start, size)), slice(max(span.stop, span.start), size)):
            if region.stop > region.start:
                block[(slice(None),) * axis + (region,)] = 0


def _reads(kernel: int, dilation: int, stride: int, outputs: int, pad: int, length: int) -> np.ndarray:
    """``(kernel, length)`` float32: row ``a`` marks the input positions (padding excluded) that kernel
    offset ``a`` reads for the outputs ``0 .. outputs-1``."""
    marks = np.zeros((kernel, length + 2 * kernel * dilation + stride * outputs), np.float32)
    for a in range(kernel):
        marks[a, a * dilation: a * dilation + stride * (outputs - 1) + 1: stride] = 1
    return np.ascontiguousarray(marks[:, pad: pad + length])


def _window(offset: int, stride: int, outputs: int, pad: int, length: int) -> tuple[slice, slice]:
    """(input positions, outputs) where a kernel offset (``offset`` = its index times the dilation) reads
    the input and not its padding."""
    first = -(-max(pad - offset, 0) // stride)
    stop = min(outputs, -(-(length + pad - offset) // stride))
    if stop <= first:
        return slice(0, 0), slice(0, 0)
    start = first * stride + offset - pad
    return slice(start, start + (stop - first - 1) * stride + 1, stride), slice(first, stop)


def _shifted_sums(geometry: LayerGeometry, x: np.ndarray, target: np.ndarray | None, gram: bool) -> tuple:
    """``(gram, input sums, cross, target sums, Σ target²)`` of a grouped 2-D Conv over an input batch
    ``(n, C, H, W)`` (and its target), without unfolding it.

    Entry ``(offset a, b; offset a', b')`` of a group's gram sums ``x[i, j] x[i + δ]`` over the positions
    that offset ``(a, b)`` reads, ``δ = (a' - a, b' - b) · dilations``: one product of the input with
    itself shifted by ``δ``, summed over the samples, per lag; then reduced over the lines and columns
    that offset reads by two small 0/1 matrices (:func:`_reads`: strides, dilations and padding live
    there). Half of the ``(2 k0 - 1)(2 k1 - 1)`` lags, the rest by symmetry; a lag as long as the input
    is skipped (it meets only padding). ``cross`` is one product per kernel offset over the outputs it
    reaches. Nothing is copied: temporaries are the size of one sample times the inputs per group.
    Float32 products, float64 results; features in canonical order ``(k0, k1, in)``.
    """
    g, (k0, k1), (s0, s1), (d0, d1) = geometry.groups, geometry.kernel, geometry.strides, geometry.dilations
    n, channels, height, width = x.shape
    m = channels // g
    (top, bottom), (left, right) = geometry._pads((height, width))
    lines = (height + top + bottom - (k0 - 1) * d0 - 1) // s0 + 1
    columns = (width + left + right - (k1 - 1) * d1 - 1) // s1 + 1
    x = x.reshape(n, g, m, height, width)
    rows_read = _reads(k0, d0, s0, lines, top, height)
    columns_read = _reads(k1, d1, s1, columns, left, width)
    block = None
    if gram:
        full = np.zeros((g, k0, k1, m, k0, k1, m))
        for da in range(k0):
            for db in range(-(k1 - 1), k1):
                r, c = da * d0, db * d1
                lo, hi = max(0, -c), width - max(0, c)  # columns j with j and j + c inside
                if (da == 0 and db < 0) or r >= height or hi <= lo:  # a mirror of a lag summed, or padding only
                    continue
                products = np.einsum("nguij,ngvij->guvij", x[:, :, :, : height - r, lo: hi],
                                     x[:, :, :, r:, lo + c: hi + c])
                sums = rows_read[:, : height - r] @ products @ columns_read[:, lo: hi].T  # (g, m, m, k0, k1)
                a, b = np.arange(k0 - da)[:, None], np.arange(max(0, -db), k1 - max(0, db))[None, :]
                part = np.moveaxis(sums[..., : k0 - da, max(0, -db): k1 - max(0, db)], (3, 4), (0, 1))
                full[:, a, b, :, a + da, b + db, :] += part
                if da or db:
                    full[:, a + da, b + db, :, a, b, :] += np.swapaxes(part, 3, 4)
        block = full.reshape(g, k0 * k1 * m, k0 * k1 * m)
    total = rows_read @ x.sum(axis=0) @ columns_read.T  # (g, m, k0, k1)
    sums = np.moveaxis(total, 1, -1).reshape(g, -1).astype(np.float64)
    if target is None:
        return block, sums, None, None, 0.0
    outs = geometry.outputs
    y = np.asarray(target, np.float32).reshape(n, g, outs, lines, columns)
    cross = np.zeros((g, k0, k1, m, outs))
    for a, b in np.ndindex(k0, k1):
        (rows_in, rows_out), (columns_in, columns_out) = (_window(a * d0, s0, lines, top, height),
                                                          _window(b * d1, s1, columns, left, width))
        cross[:, a, b] = np.einsum("nguij,ngoij->guo", x[:, :, :, rows_in, columns_in], y[..., rows_out, columns_out])
    flat = y.reshape(-1)
    return (block, sums, cross.reshape(g, -1, outs), y.sum(axis=(0, 3, 4), dtype=np.float64).reshape(g, outs),
            float(np.dot(flat, flat)))


@dataclass
class LayerStatistics:
    """``gram = Σ AᵀA`` per group, ``cross = Σ AᵀY`` and ``Σ Y²`` over the rows ``A = [X, 1]`` (``[X]`` without
    a bias column); ``rows`` counts them. Mergeable: sums over shards equal the sums over all rows.

    With ``noise``, ``row_noise`` and ``sample_noise`` are ``Σ_{i≠j} (x xᵀ)²_ij`` summed over rows and
    ``Σ_{i≠j} (X_sᵀX_s)²_ij`` over samples (a leading index of a MatMul / Gemm input; an unfolded Conv
    counts rows only, a directly summed depthwise one neither): see :meth:`shrinkage`.

    Products are float32 per chunk (BLAS speed), sums float64. :meth:`anchor` sums the error of
    ``start`` weights, ``Σ |A start - Y|²``, directly (one more product) near a match, so residuals
    there are exact instead of a difference of large float32 sums.
    """

    gram: np.ndarray          # (G, K [+1], K [+1]) float64
    cross: np.ndarray | None  # (G, K [+1], N) float64, None without a target
    bias: bool
    target_sq: float = 0.0
    rows: int = 0
    start: np.ndarray | None = None  # (G, K [+1], N)
    start_sq: float = 0.0
    row_noise: np.ndarray | None = None  # (G,); None: not collected
    sample_noise: float = 0.0
    samples: int = 0

    @classmethod
    def empty(cls, geometry: LayerGeometry, *, bias: bool = False, target: bool = False, noise: bool = False
              ) -> LayerStatistics:
        size = geometry.inputs + bias
        return cls(np.zeros((geometry.groups, size, size)),
                   np.zeros((geometry.groups, size, geometry.outputs)) if target else None, bias,
                   row_noise=np.zeros(geometry.groups) if noise else None)

    def update(self, geometry: LayerGeometry, x: np.ndarray, y: np.ndarray | None = None, *, gram: bool = True) -> bool:
        """Fold one batch (the layer's input, and its target when the statistics have one) in.

        ``gram=False`` leaves ``gram`` alone (a layer reading the same input as one before reuses its
        gram). False (nothing folded) when the target does not have the layer's rows and width.
        """
        rows = geometry.input_rows(x)
        if rows < 0:
            return False
        if self.cross is not None:
            first = y[0] if isinstance(y, list) else y
            if y is None or np.ndim(first) == 0 or geometry.output_rows(y) != rows or \
                    (np.shape(first)[-1 if not geometry.is_conv else 1] != geometry.outputs * geometry.groups) or \
                    (isinstance(y, list) and any(np.shape(b)[1:] != np.shape(first)[1:] for b in y)):
                return False
            targets = geometry.targets(y)
        if geometry.direct:
            self._update_direct(geometry, x, y if self.cross is not None else None, gram)
            return True
        k = geometry.inputs  # the bias column (of ones) is summed separately: no copy of the rows with it
        noise = gram and self.row_noise is not None
        if noise and not geometry.is_conv:
            rows_last = np.moveaxis(np.asarray(x), geometry.data_axis, -1)
            units = rows_last.reshape(-1, rows_last.shape[-2] if rows_last.ndim > 2 else 1, k)
            self.sample_noise += sample_noise(units)
            self.samples += len(units)
        for at in geometry.columns(x):
            sums = _row_sums(at, -1) if self.bias and gram else None  # the gram's bias row
            if noise:
                squares = at * at  # per row Σ_{i≠j} x_i² x_j² = |x|⁴ - Σ x_i⁴
                norms = squares.sum(axis=1, dtype=np.float64)
                self.row_noise += np.einsum("gr,gr->g", norms, norms) - [_square_sum(g) for g in squares]
                del squares
            if gram:
                # one group: 2-D A Aᵀ, which numpy computes as a symmetric rank-k update (half the work)
                self.gram[:, :k, :k] += at[0] @ at[0].T if len(at) == 1 else at @ np.swapaxes(at, 1, 2)
                if self.bias:
                    self.gram[:, :k, k] += sums
                    self.gram[:, k, :k] += sums
                    self.gram[:, k, k] += at.shape[2]
            self.rows += at.shape[2]
            if self.cross is not None:
                t = next(targets)
                self.cross[:, :k] += at @ t
                if self.bias:
                    self.cross[:, k] += _row_sums(t, -2)
                self.target_sq += _square_sum(t)
        return True

    def _update_direct(self, geometry: LayerGeometry, x: np.ndarray, y: np.ndarray | None, gram: bool) -> None:
        """:meth:`update` of a grouped 2-D Conv from shifted products of its input (:func:`_shifted_sums`)."""
        k = geometry.inputs
        block, sums, cross, y_sums, y_sq = _shifted_sums(geometry, np.asarray(x, dtype=np.float32), y, gram)
        rows = geometry.input_rows(x)
        if gram:
            self.gram[:, :k, :k] += block
            if self.bias:
                self.gram[:, :k, k] += sums
                self.gram[:, k, :k] += sums
                self.gram[:, k, k] += rows
        self.rows += rows
        if cross is not None:
            self.cross[:, :k] += cross
            if self.bias:
                self.cross[:, k] += y_sums
            self.target_sq += y_sq

    def anchor(self, start: np.ndarray, near: float, exact: Callable[[np.ndarray], float]) -> None:
        """Make :meth:`residual` relative to ``start`` weights ``(G, K [+1], N)``: their error, then the change.

        The error comes from the sums; when it is below ``near`` (relative) it is ``exact(start)``, summed
        over the rows (:meth:`start_error`): the sums alone lose it to float32 rounding.
        """
        self.start, self.start_sq = None, 0.0
        estimate = self.residual(start)
        self.start, self.start_sq = start, estimate
        if estimate < near**2 * self.target_sq:
            self.start_sq = exact(start)

    def start_error(self, geometry: LayerGeometry, xs: list[np.ndarray], ys: list[np.ndarray],
                    start: np.ndarray) -> float:
        """``Σ |A start - Y|²`` over these batches, directly (one more product)."""
        weights, k = start.astype(np.float32), geometry.inputs
        total = 0.0
        for x, y in zip(xs, ys):
            for at, t in zip(geometry.columns(x), geometry.targets(y)):
                error = np.swapaxes(at, 1, 2) @ weights[:, :k] - t
                if self.bias:
                    error += weights[:, k:]
                total += _square_sum(error)
        return total

    def update_batches(self, geometry: LayerGeometry, xs: list[np.ndarray], ys: list[np.ndarray] | None = None, *,
                       gram: bool = True) -> bool:
        """:meth:`update` over batches, consecutive ones joined up to ``CHUNK_BYTES`` (fewer, bigger products)."""
        return all(self.update(geometry, x, y, gram=gram)
                   for x, y in _joined(geometry, xs, ys if ys is not None else [None] * len(xs)))

    def update_pair(self, geometry: LayerGeometry, xs: list[np.ndarray], references: list[np.ndarray]) -> bool:
        """Fold the layer's inputs in and ``cross`` against other inputs of the same shape: ``Σ Aᵀ A_ref``
        per group, ``(G, K [+1], K [+1])`` (the reference model's input; ``cross @ W`` is then ``Σ Aᵀ A_ref W``,
        the reference layer's output as the target). False when the shapes differ."""
        if any(np.shape(x) != np.shape(r) for x, r in zip(xs, references)):
            return False
        k = geometry.inputs
        cross = np.zeros_like(self.gram)
        for x, reference in _joined(geometry, xs, references):
            if not self.update(geometry, x):
                return False
            for at, rt in zip(geometry.columns(x), geometry.columns(reference)):
                cross[:, :k, :k] += at @ np.swapaxes(rt, 1, 2)
                if self.bias:
                    cross[:, :k, k] += at.sum(axis=2, dtype=np.float64)
                    cross[:, k, :k] += rt.sum(axis=2, dtype=np.float64)
                    cross[:, k, k] += at.shape[2]
        self.cross = cross
        return True

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics(self.gram + other.gram, None if self.cross is None else self.cross + other.cross,
                               self.bias, self.target_sq + other.target_sq, self.rows + other.rows, self.start,
                               self.start_sq + other.start_sq,
                               None if self.row_noise is None else self.row_noise + other.row_noise,
                               self.sample_noise + other.sample_noise, self.samples + other.samples)

    @property
    def hessian(self) -> np.ndarray:
        """``XᵀX`` per group without the bias column: ``(G, K, K)``."""
        return self.gram[:, : self.gram.shape[1] - self.bias, : self.gram.shape[1] - self.bias]

    def shrinkage(self) -> np.ndarray:
        """Per group, the weight ``α`` in ``(1 - α) XᵀX + α diag(XᵀX)`` that best estimates the inputs' true
        second moment from these rows (Ledoit & Wolf 2004 with a diagonal target, as Schäfer & Strimmer 2005):
        the estimated sampling variance of the off-diagonal sums over their square,
        ``α = Σ_{i≠j} Σ_u (x_u x_uᵀ)²_ij / Σ_{i≠j} (XᵀX)²_ij - 1 / units``.

        Computed with rows and with samples as the independent units, the larger kept: rows alone
        understate the noise when a sample's rows move together (tokens an attention layer averaged),
        a few samples alone give a noisy estimate. White inputs over few rows: ``α`` near 1 (GPTQ
        becomes round-to-nearest); strongly correlated inputs: near 0.
        """
        if self.row_noise is None:
            raise ValueError("shrinkage needs statistics collected with noise=True")
        h = self.hessian
        diagonal = np.einsum("gii->gi", h)
        off = np.einsum("gij,gij->g", h, h) - np.einsum("gi,gi->g", diagonal, diagonal)
        safe = np.where(off > 0, off, 1.0)
        alpha = self.row_noise / safe - 1 / max(self.rows, 1)
        if self.samples:
            alpha = np.maximum(alpha, self.sample_noise / safe - 1 / self.samples)
        return np.clip(np.where(off > 0, alpha, 0.0), 0.0, 1.0)

    def shrunk_hessian(self) -> np.ndarray:
        """``(1 - α) XᵀX + α diag(XᵀX)`` per group (``α`` from :meth:`shrinkage`): ``(G, K, K)``."""
        alpha = self.shrinkage()[:, None, None]
        h = self.hessian
        return (1 - alpha) * h + alpha * (np.eye(h.shape[1]) * h)

    def centered(self) -> np.ndarray:
        """``(X - mean)ᵀ(X - mean)`` per group (needs the bias column): the error that remains once a
        weight change's mean effect is moved into the bias (bias correction)."""
        k = self.gram.shape[1] - 1
        sums = self.gram[:, :k, k]
        return self.gram[:, :k, :k] - sums[:, :, None] * sums[:, None, :] / max(self.rows, 1)

    def fit_error(self, group: int, weights: np.ndarray, reference: np.ndarray) -> float:
        """``Σ |A W - A_ref R|²`` of one group's ``weights`` against the ``reference`` weights' output, less its
        constant ``|A_ref R|²`` (so: to compare weights on the same rows): ``A_ref`` is the paired input of
        :meth:`update_pair`, or ``A`` itself without one."""
        gram = self.gram[group]
        target = (gram if self.cross is None else self.cross[group]) @ reference
        return float(np.sum(weights * (gram @ weights)) - 2 * np.sum(weights * target))

    def residual(self, weights: np.ndarray) -> float:
        """``Σ |A W - Y|²`` from the sums alone; ``weights`` as ``(G, K [+1], N)``.

        After :meth:`anchor`: the error of ``start`` plus the change, ``2 Δᵀ(G start - C) + ΔᵀGΔ``.
        """
        if self.start is None:  # G W in float32: its rounding is far below the cancellation of these sums
            product = self.gram.astype(np.float32) @ weights.astype(np.float32)
            return float(np.sum(weights * product) - 2 * np.sum(weights * self.cross) + self.target_sq)
        if weights is self.start:
            return self.start_sq
        delta = weights - self.start
        gram = self.gram.astype(np.float32)  # products in float32: the terms are small next to start_sq
        both = (gram @ np.stack([self.start, delta], axis=-1).reshape(*delta.shape[:2], -1).astype(np.float32)
                ).reshape(*delta.shape, 2)
        gradient = both[..., 0] - self.cross
        return float(self.start_sq + 2 * np.sum(delta * gradient) + np.sum(delta * both[..., 1]))
