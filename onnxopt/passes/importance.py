"""How much a weight matters: the scores prune ranks weights by and prune-neurons ranks neurons by.

Magnitude ``|w|``, or Wanda's ``|w| * ||x_in||`` with the input norms from one streaming calibration
run (:func:`activation_stats`), and the exact target counts both passes meet.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from ..calibration import TensorStats
from .base import Pass, count
from .weights import PrunableTensor, per_input_channel


def target_count(fraction: float, size: int) -> int:
    """How many of ``size`` items a fraction names, rounded half up (the exact target)."""
    return int(math.floor(fraction * size + 0.5))


def activation_stats(pass_: Pass, model: onnx.ModelProto, tensors: list[PrunableTensor],
                     stats: dict[str, int | float]) -> dict[str, list[TensorStats]]:
    """Per weight name, the channel statistics of each use's data input over the calibration data.

    One streaming calibration run collects every data input at once. Weights inside subgraphs
    have no observable input: they get none (ranked by magnitude) and are counted.
    """
    from ..calibration import collect

    feeds = pass_.context.calibration_feeds(pass_.name)
    axes = {u.data: u.data_axis for t in tensors if t.top_level for u in t.uses}
    collected = collect(model, feeds, [], sumsq_axes=axes, executor=pass_.context.executor) if axes else {}
    if any(not t.top_level for t in tensors):
        count(stats, "wanda_fallback_magnitude_in_subgraph", sum(not t.top_level for t in tensors))
    return {t.name: [collected[u.data] for u in t.uses] for t in tensors if t.top_level}


def input_norm(inputs: list[TensorStats], centered: bool = False) -> np.ndarray:
    """L2 norm of each input channel over the calibration data (a tied weight: over all its inputs).

    ``centered`` measures about each channel's mean: what pruning leaves as error once the
    pruned weights' mean contribution is added back to the bias.
    """
    sumsq = sum(s.channel_sumsq - (s.channel_sum ** 2 / s.channel_count if centered else 0.0) for s in inputs)
    return np.sqrt(np.maximum(sumsq, 0.0))


def importance(tensor: PrunableTensor, canonical: np.ndarray, norm: np.ndarray | None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Importance on the canonical ``(out, ..., in)`` view; weights already zero rank below all others.

    Magnitude is ``abs`` in the weight's dtype (exact, order kept; zeros are already the smallest);
    Wanda's products are float64, and zeros are moved below a zero norm's products. The result
    keeps the weight's memory layout (so prune's ``memory_order`` is a view). ``out``: where to write
    it (a view in that layout, of the weight's dtype or float64 for Wanda).
    """
    if norm is None:
        return np.abs(canonical, out=out)
    score = np.abs(canonical, out=out, dtype=np.float64)
    np.multiply(score, per_input_channel(canonical.shape, norm, tensor.use.groups), out=score)
    score[canonical == 0] = -1.0
    return score
