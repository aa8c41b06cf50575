"""Block-wise low-bit weight grids and onnxruntime's packed layouts, shared by RTN and GPTQ.

A weight in ONNX MatMul layout ``(K, N)`` is cut along K into blocks of ``block_size`` rows; every
block of every output column gets its own scale and zero point, and each value becomes an
unsigned code in ``[0, 2**bits - 1]`` with ``w ~ (code - zero_point) * scale``. Symmetric grids
fix the zero point at ``2**(bits - 1)`` (what ``MatMulNBits`` assumes when it has no zero-point
input); asymmetric grids span each block's min..max, widened to include 0 (the zero point is a code). ``grid="mse"`` also tries narrower ranges
per block and keeps the one with the smallest squared error (outliers cost less than the
resolution the rest of the block loses to them).

A K that ``block_size`` does not divide is padded with zeros to whole blocks (the padding codes
dequantize to 0), as ``MatMulNBits`` and blocked ``DequantizeLinear`` both expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GRIDS = ("minmax", "mse")
MSE_SHRINKS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7], dtype=np.float32)
CHUNK_ELEMENTS = 1 << 22  # columns are quantized in chunks of about this many weights (bounded temporaries)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def block_grid(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of every block: ``blocks`` is ``(..., g, N)``, reduced over its ``g`` axis."""
    return range_grid(*_block_range(blocks), bits, symmetric)


def _block_range(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max per block, widened to include 0: a zero point must be one of the codes."""
    return np.minimum(blocks.min(axis=-2), 0), np.maximum(blocks.max(axis=-2), 0)


def range_grid(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """The grid covering ``[lo, hi]`` per block and column.

    Symmetric: the value of largest magnitude maps to code 0 exactly (``scale = -absmax / 2**(bits-1)``
    keeps its sign), so the whole ``[-2**(bits-1), 2**(bits-1) - 1]`` range is used. Asymmetric:
    ``[lo, hi]`` maps onto ``[0, maxq]``. A block of zeros gets scale 1 (codes equal the zero point).
    """
    maxq = max_code(bits)
    if symmetric:
        half = 1 << (bits - 1)
        scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -half
        zero_point = np.full(scale.shape, half, dtype=np.uint8)
    else:
        scale = (hi - lo) / maxq
        safe = np.where(scale == 0, 1, scale)
        zero_point = np.clip(np.rint(-lo / safe), 0, maxq).astype(np.uint8)
    return np.where(scale == 0, 1, scale).astype(lo.dtype), zero_point


def to_codes(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``blocks (..., g, N)`` on the grid ``scale, zero_point (..., N)``."""
    codes = np.rint(blocks / scale[..., None, :]) + zero_point[..., None, :]
    return np.clip(codes, 0, max_code(bits)).astype(np.uint8)


def from_codes(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Values of codes ``(..., g, N)`` on their grid."""
    return (codes.astype(scale.dtype) - zero_point[..., None, :].astype(scale.dtype)) * scale[..., None, :]


def grid_chooser(bits: int, symmetric: bool, grid: str = "minmax") -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The grid of one group ``(g, N)`` -> ``(scale (N,), zero_point (N,))``: what GPTQ asks per group."""

    def choose(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale, zero_point, _ = _best_grid(group[None], bits, symmetric, grid)
        return scale[0], zero_point[0]

    return choose


def _best_grid(blocks: np.ndarray, bits: int, symmetric: bool, grid: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid per block (min-max, or the best of the shrunk ranges) and its squared error per block."""
    lo, hi = _block_range(blocks)
    scale, zero_point = range_grid(lo, hi, bits, symmetric)
    work = np.empty_like(blocks)
    best = _block_error(blocks, scale, zero_point, bits, work)
    for shrink in MSE_SHRINKS[1:] if grid == "mse" else ():
        s, z = range_grid(lo * shrink, hi * shrink, bits, symmetric)
        err = _block_error(blocks, s, z, bits, work)
        better = err < best
        scale, zero_point, best = np.where(better, s, scale), np.where(better, z, zero_point), np.minimum(err, best)
    return scale, zero_point, best


def _block_error(blocks, scale, zero_point, bits, work) -> np.ndarray:
    """Squared rounding error per block and column, computed in place in ``work`` (no other temporaries)."""
    scale, zero_point = scale[..., None, :], zero_point[..., None, :].astype(blocks.dtype)
    np.divide(blocks, scale, out=work)
    np.rint(work, out=work)
    work += zero_point
    np.clip(work, 0, max_code(bits), out=work)
    work -= zero_point
    work *= scale
    work -= blocks
    return np.einsum("...gn,...gn->...n", work, work)


@dataclass
class BlockQuantized:
    """Codes ``(K_padded, N)``, scales and zero points ``(K_padded // block_size, N)`` of a ``(K, N)`` weight."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int
    sq_error: float | None = None  # |W - W_q|^2 when the grid search computed it
    loss_curve: list[float] | None = None  # learned rounding's loss per step (sampled), for the report

    def dequantize(self) -> np.ndarray:
        blocks = self.codes.reshape(-1, self.block_size, self.codes.shape[1])
        return from_codes(blocks, self.scales, self.zero_points).reshape(self.codes.shape)[: self.k]


def padded_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``(K, N)`` as ``(blocks, block_size, N)``, K padded with zero rows to whole blocks."""
    k, n = weight.shape
    pad = -k % block_size
    if pad:
        weight = np.concatenate([weight, np.zeros((pad, n), dtype=weight.dtype)])
    return weight.reshape(-1, block_size, n)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, grid: str = "minmax",
                    scale_dtype=np.float32) -> BlockQuantized:
    """Round-to-nearest on the block grid (one chunk of columns; see :func:`quantize_for_nbits` for big weights).

    Scales stored in a narrower ``scale_dtype`` (float16 models) are rounded to it before the codes are chosen,
    so the codes fit the scales the runtime will use."""
    blocks = padded_blocks(weight, block_size)
    scale, zero_point, error = _best_grid(blocks, bits, symmetric, grid)
    sq_error = float(error.sum())
    if np.dtype(scale_dtype) != scale.dtype:
        scale, sq_error = scale.astype(scale_dtype).astype(scale.dtype), None
    codes = to_codes(blocks, scale, zero_point, bits).reshape(-1, weight.shape[1])
    return BlockQuantized(codes, scale, zero_point, bits, block_size, weight.shape[0], sq_error)


# --------------------------------------------------------------------------- onnxruntime layouts


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes along the last axis packed into bytes, first value in the low bits (4-bit: two per byte)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=codes.dtype)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    both = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


@dataclass
class NBitsWeight:
    """A weight in ``com.microsoft.MatMulNBits`` form: ``b (N, blocks, block_size*bits/8)`` uint8,
    ``scales (N, blocks)``, ``zero_points (N, ceil(blocks*bits/8))`` uint8 or None (symmetric).
    ``sq_error`` and ``sq_norm`` are ``|W - W_q|^2`` and ``|W|^2`` (float64) for the report."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int
    sq_error: float = 0.0
    sq_norm: float = 0.0


def nbits_layout(q: BlockQuantized, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``MatMulNBits`` arrays of block-quantized codes: per output column, its blocks, packed."""
    n = q.codes.shape[1]
    per_column = q.codes.T.reshape(n, -1, q.block_size)
    b = pack_codes(per_column, q.bits)
    scales = np.ascontiguousarray(q.scales.T)
    zero_points = None if symmetric else pack_codes(np.ascontiguousarray(q.zero_points.T), q.bits)
    return b, scales, zero_points


def quantize_for_nbits(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, grid: str = "minmax",
                       quantized: BlockQuantized | None = None, scale_dtype=np.float32) -> NBitsWeight:
    """A ``(K, N)`` weight (any strides: a transposed view is fine) in ``MatMulNBits`` form.

    Columns go in chunks of about :data:`CHUNK_ELEMENTS` weights, so the temporaries stay small
    next to the weight itself whatever its size. ``quantized`` (codes from GPTQ) is packed as given.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    blob = block_size * bits // 8
    out = NBitsWeight(np.empty((n, blocks, blob), np.uint8), np.empty((n, blocks), np.float32),
                      None if symmetric else np.empty((n, -(-blocks * bits // 8)), np.uint8),
                      k, n, bits, block_size)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        cols = slice(start, min(n, start + step))
        chunk = np.ascontiguousarray(weight[:, cols], dtype=np.float32)
        if quantized is None:
            q = quantize_blocks(chunk, bits, block_size, symmetric, grid, scale_dtype)
        else:
            q = BlockQuantized(quantized.codes[:, cols], quantized.scales[:, cols], quantized.zero_points[:, cols],
                               bits, block_size, k)
        out.b[cols], out.scales[cols], zero_points = nbits_layout(q, symmetric)
        if zero_points is not None:
            out.zero_points[cols] = zero_points
        if q.sq_error is None:
            diff = q.dequantize() - chunk
            q.sq_error = float(np.vdot(diff, diff))
        out.sq_error += q.sq_error
        out.sq_norm += float(np.vdot(chunk, chunk))
    return out
