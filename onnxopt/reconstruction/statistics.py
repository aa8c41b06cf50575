"""Per-layer input statistics streamed from calibration data: ``XᵀX`` (and ``XᵀY`` against a target).

A layer's rows are its inputs as the weight sees them: a MatMul / Gemm reads rows of its data
input (all leading axes flattened); a Conv reads the unfolded patches of its input (im2col), one
row per output position, split by group (a depthwise Conv is ``C`` groups of ``kernel`` inputs).
Feature order is the canonical weight order ``(kernel..., in)`` of :mod:`onnxopt.passes.weights`,
so a group's weight as a MatMul is ``canonical[outs of group].reshape(outs, -1).T``.

Sums are float64, mergeable, and never hold rows: a batch is unfolded in chunks of at most
``CHUNK_BYTES`` so a big feature map never exists unfolded in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

CHUNK_BYTES = 32 << 20  # unfolded rows per chunk (float32)


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

    def rows(self, x: np.ndarray) -> Iterator[np.ndarray]:
        """The input as float32 rows ``(groups, R, inputs)``, in chunks of bounded size."""
        if not self.is_conv:
            flat = np.moveaxis(np.asarray(x), self.data_axis, -1).reshape(-1, self.inputs)
            step = max(1, CHUNK_BYTES // (4 * self.inputs))
            for start in range(0, len(flat), step):
                yield flat[start: start + step].astype(np.float32, copy=False)[None]
            return
        x = np.asarray(x, dtype=np.float32)
        spatial = len(self.kernel)
        padded = np.pad(x, [(0, 0), (0, 0), *self._pads(x.shape[2:])])
        span = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=tuple(range(2, 2 + spatial)))
        windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in self.strides),
                           *(slice(None, None, d) for d in self.dilations))]
        # (B, C, out..., k...) -> (B, out..., G, k..., C/G): the canonical feature order within a group
        batch, channels, out = windows.shape[0], windows.shape[1], windows.shape[2: 2 + spatial]
        per_sample = math.prod(out) * channels * math.prod(self.kernel)
        lines = max(1, CHUNK_BYTES // (4 * max(per_sample // max(out[0], 1), 1)))
        for b in range(batch):
            for start in range(0, out[0], lines):
                part = windows[b, :, start: start + lines]  # (C, out..., k...)
                part = part.reshape(self.groups, channels // self.groups, -1, *self.kernel)
                part = np.moveaxis(part, 1, -1)  # (G, positions, k..., C/G)
                yield part.reshape(self.groups, part.shape[1], self.inputs)

    def targets(self, y: np.ndarray) -> Iterator[np.ndarray]:
        """The layer's output (or its teacher's) as rows ``(groups, R, outputs)``, chunked like :meth:`rows`."""
        y = np.asarray(y)
        if not self.is_conv:
            flat = y.reshape(-1, self.outputs)
            step = max(1, CHUNK_BYTES // (4 * self.inputs))
            for start in range(0, len(flat), step):
                yield flat[start: start + step].astype(np.float32, copy=False)[None]
            return
        per_line = math.prod(y.shape[3:]) * self.inputs * self.groups
        lines = max(1, CHUNK_BYTES // (4 * max(per_line, 1)))
        for b in range(y.shape[0]):
            for start in range(0, y.shape[2], lines):
                part = y[b, :, start: start + lines].reshape(self.groups, self.outputs, -1)
                yield np.swapaxes(part, 1, 2).astype(np.float32, copy=False)

    def output_rows(self, y: np.ndarray) -> int:
        """How many rows an output holds (to check a target against the input's rows)."""
        y = np.asarray(y)
        return y.size // (self.outputs * self.groups)

    def input_rows(self, x: np.ndarray) -> int:
        x = np.asarray(x)
        if not self.is_conv:
            return x.size // self.inputs if x.ndim and x.shape[self.data_axis] == self.inputs else -1
        pads = self._pads(x.shape[2:])
        out = [(size + a + b - (k - 1) * d - 1) // s + 1
               for size, (a, b), k, d, s in zip(x.shape[2:], pads, self.kernel, self.dilations, self.strides)]
        return x.shape[0] * math.prod(out)


@dataclass
class LayerStatistics:
    """``gram = Σ AᵀA`` per group, ``cross = Σ AᵀY`` and ``Σ Y²`` over the rows ``A = [X, 1]`` (``[X]`` without
    a bias column); ``rows`` counts them. Mergeable: sums over shards equal the sums over all rows."""

    gram: np.ndarray          # (G, K [+1], K [+1]) float64
    cross: np.ndarray | None  # (G, K [+1], N) float64, None without a target
    bias: bool
    target_sq: float = 0.0
    rows: int = 0

    @classmethod
    def empty(cls, geometry: LayerGeometry, *, bias: bool = False, target: bool = False) -> LayerStatistics:
        size = geometry.inputs + bias
        return cls(np.zeros((geometry.groups, size, size)),
                   np.zeros((geometry.groups, size, geometry.outputs)) if target else None, bias)

    def update(self, geometry: LayerGeometry, x: np.ndarray, y: np.ndarray | None = None) -> bool:
        """Fold one batch (the layer's input, and its target when the statistics have one) in.

        False (nothing folded) when the target does not have the layer's rows and width.
        """
        rows = geometry.input_rows(x)
        if rows < 0:
            return False
        if self.cross is not None:
            if y is None or np.ndim(y) == 0 or geometry.output_rows(y) != rows or \
                    (np.shape(y)[-1 if not geometry.is_conv else 1] != geometry.outputs * geometry.groups):
                return False
            targets = geometry.targets(y)
        for chunk in geometry.rows(x):
            a = np.concatenate([chunk, np.ones((*chunk.shape[:2], 1), np.float32)], axis=2) if self.bias else chunk
            at = np.swapaxes(a, 1, 2)
            self.gram += at @ a  # float32 products per chunk, float64 sums across chunks
            self.rows += a.shape[1]
            if self.cross is not None:
                t = next(targets)
                self.cross += at @ t
                self.target_sq += float(np.vdot(t.astype(np.float64), t))
        return True

    def merge(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics(self.gram + other.gram, None if self.cross is None else self.cross + other.cross,
                               self.bias, self.target_sq + other.target_sq, self.rows + other.rows)

    @property
    def hessian(self) -> np.ndarray:
        """``XᵀX`` per group without the bias column: ``(G, K, K)``."""
        return self.gram[:, : self.gram.shape[1] - self.bias, : self.gram.shape[1] - self.bias]

    def residual(self, weights: np.ndarray) -> float:
        """``Σ |A W - Y|²`` from the sums alone; ``weights`` as ``(G, K [+1], N)``."""
        gw = self.gram @ weights
        return float(np.sum(weights * gw) - 2 * np.sum(weights * self.cross) + self.target_sq)
