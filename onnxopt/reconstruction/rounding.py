"""An iterative solver with learning-rate schedules: learned rounding of quantized weights (AdaRound).

What has no closed form: choosing, for each weight, whether to round down or up so that the
layer's output error ``tr(ΔᵀHΔ)`` (``Δ = Ŵ - W``, ``H = XᵀX``) is smallest, where nearest rounding
treats every weight alone. Following Nagel et al. 2020, each weight gets a continuous variable
``v``; the rounded weight is ``s · (floor(w / s) + h(v))`` with the rectified sigmoid ``h``. The
loss is the relative layer error plus ``λ · mean(1 - |2h - 1|^β)``, which pushes every ``h`` to 0
or 1 as ``β`` is annealed from 20 to 2 (after a warm start without it). Adam or SGD, with a
learning-rate schedule (``cosine``, ``step``, ``exponential``, ``constant``) after a linear warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .solvers import blas_threads

SCHEDULES = ("cosine", "step", "exponential", "constant")
OPTIMIZERS = ("adam", "sgd")
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
CURVE_POINTS = 50  # loss values kept per layer for the report


@dataclass(frozen=True)
class Schedule:
    """Learning rate at each step: linear warm-up over ``warmup`` (fraction of ``steps``), then decay.

    ``step`` divides by 10 at 1/2 and 3/4 of the steps after warm-up; ``exponential`` decays to
    1 % at the end; ``cosine`` to 0. The default is constant: the annealed regulariser does its work
    at the end, where decayed rates barely move the variables (measured on correlated 8-bit layers,
    300 Adam steps at 0.1: layer error vs nearest 0.10 constant, 0.60 cosine, 0.68 step, 0.67 exponential).
    """

    kind: str = "constant"
    rate: float = 0.1
    steps: int = 100
    warmup: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {'|'.join(SCHEDULES)}, not '{self.kind}'")

    def __call__(self, step: int) -> float:
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.rate * (step + 1) / warm
        t = (step - warm) / max(self.steps - warm, 1)
        if self.kind == "cosine":
            return self.rate * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return self.rate * (0.1 ** ((t >= 0.5) + (t >= 0.75)))
        if self.kind == "exponential":
            return self.rate * 0.01 ** t
        return self.rate


def _rectified(v: np.ndarray) -> np.ndarray:
    return np.clip(1 / (1 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0, 1)


def layer_error(delta: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(ΔᵀHΔ)``: the layer's output error from a weight change, by the input statistics."""
    return float(np.sum(delta * (hessian @ delta)))


def refine_codes(codes: np.ndarray, weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray,
                 zero_point: np.ndarray, *, qmin: int, qmax: int, sweeps: int = 3, block: int = 128
                 ) -> tuple[np.ndarray, int]:
    """Exact coordinate descent on ``tr(ΔᵀHΔ)``: row by row, move each code one step up or down where that
    lowers the layer error (the columns are independent, so a whole row moves at once exactly); the
    gradient ``HΔ`` is updated lazily per block of rows. Never raises the error. Returns (codes, moves).
    """
    c = np.asarray(codes, dtype=np.float64).copy()
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), c.shape)
    z = np.broadcast_to(np.asarray(zero_point, dtype=np.float64), c.shape)
    h = np.asarray(hessian, dtype=np.float64)
    gradient = h @ ((c - z) * s - np.asarray(weight, dtype=np.float64))
    diagonal, rows, moves = np.diag(h), len(c), 0
    for _ in range(sweeps):
        moved = 0
        for i1 in range(0, rows, block):
            i2 = min(i1 + block, rows)
            change = np.zeros((i2 - i1, c.shape[1]))
            for i in range(i1, i2):
                g, si = gradient[i] + h[i, i1:i] @ change[: i - i1], s[i]
                up, down = si * (si * diagonal[i] + 2 * g), si * (si * diagonal[i] - 2 * g)
                step = np.where((up < np.minimum(down, 0)) & (c[i] < qmax), 1.0,
                                np.where((down < 0) & (c[i] > qmin), -1.0, 0.0))
                c[i] += step
                change[i - i1] = step * si
            moved += int(np.count_nonzero(change))
            gradient += h[:, i1:i2] @ change
        moves += moved
        if not moved:
            break
    return c, moves


def learned_rounding(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, *, qmin: int, qmax: int,
                     zero_point: np.ndarray | float = 0, schedule: Schedule = Schedule(), optimizer: str = "adam",
                     regularization: float = 3.0, warm_start: float = 0.2, start: np.ndarray | None = None,
                     fallback: np.ndarray | None = None, refine_sweeps: int = 0) -> tuple[np.ndarray, list[float], bool]:
    """Integer codes for ``weight (K, N)`` on the grid ``(code - zero_point) · scale`` (both broadcast to
    ``(K, N)``), codes in ``[qmin, qmax]``, learned against ``hessian (K, K)``.

    Each code is the floor or the ceiling of ``start`` (default: the weight itself) on the grid; GPTQ's
    compensated weights, say, let it choose around GPTQ's codes. Returns ``(codes int64, loss curve,
    learned)``: the better of the learned codes and the ``fallback`` codes (default: nearest rounding
    of the weight), then refined by ``refine_sweeps`` sweeps of :func:`refine_codes` (which may move a
    code past the floor / ceiling); ``learned`` is False when that is the fallback unchanged (never
    worse than the fallback).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {'|'.join(OPTIMIZERS)}, not '{optimizer}'")
    w = np.asarray(weight, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), w.shape)
    z = np.broadcast_to(np.asarray(zero_point, dtype=np.float64), w.shape)
    safe = np.where(s == 0, 1.0, s)
    ratio = w / safe + z
    nearest = np.clip(np.rint(ratio), qmin, qmax) if fallback is None else np.asarray(fallback, dtype=np.float64)
    if start is not None:
        ratio = np.asarray(start, dtype=np.float64) / safe + z
    base = np.floor(ratio)
    rest = np.clip(ratio - base, 0.01, 0.99)
    v = (-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).astype(np.float32)  # h(v) = rest: start where the weight is
    fixed = (base < qmin) | (base + 1 > qmax) | (s == 0)  # no choice at the grid's ends
    exact = layer_error((nearest - z) * s - w, h)
    if exact <= 0:  # the fallback is exact: nothing to learn (and no scale for relative losses)
        return nearest.astype(np.int64), [0.0], False
    reference = exact  # losses relative to the fallback's
    h32 = h.astype(np.float32)
    # the loop runs in float32 (twice numpy's speed); the final choice is checked in float64
    w32, s32, z32, base32 = (np.ascontiguousarray(a, dtype=np.float32) for a in (w, s, z, base))
    nearest_delta = ((nearest - z) * s - w).astype(np.float32)
    m = np.zeros_like(v)
    second = np.zeros_like(v)
    curve: list[float] = []
    start_reg = int(warm_start * schedule.steps)
    with blas_threads(float(h.size) * w.shape[1]):  # small layers on one BLAS thread
        for step in range(schedule.steps):
            sig = 1 / (1 + np.exp(-np.clip(v, -30, 30)))
            soft = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
            delta = np.where(fixed, nearest_delta, (base32 + soft - z32) * s32 - w32)
            hd = h32 @ delta
            loss = float(np.vdot(delta, hd)) / reference
            grad_soft = hd * np.float32(2 / reference) * s32
            if step >= start_reg:  # annealed regulariser: beta 20 -> 2 after the warm start
                beta = 20 + (2 - 20) * (step - start_reg) / max(schedule.steps - start_reg, 1)
                centred = 2 * soft - 1
                loss += regularization * float(np.mean(1 - np.abs(centred) ** beta))
                grad_soft -= np.float32(regularization * beta * 2 / v.size) * np.abs(centred) ** np.float32(beta - 1) * np.sign(centred)
            inside = (soft > 0) & (soft < 1) & ~fixed
            grad = np.where(inside, grad_soft * sig * (1 - sig) * np.float32(ZETA - GAMMA), np.float32(0))
            rate = schedule(step)
            if optimizer == "adam":
                m = np.float32(0.9) * m + np.float32(0.1) * grad
                second = np.float32(0.999) * second + np.float32(0.001) * grad * grad
                v -= np.float32(rate / (1 - 0.9 ** (step + 1))) * m / (np.sqrt(second / np.float32(1 - 0.999 ** (step + 1)))
                                                                       + np.float32(1e-8))
            else:
                v -= np.float32(rate) * grad
            curve.append(loss)
    picks = np.linspace(0, schedule.steps - 1, min(CURVE_POINTS, schedule.steps)).round().astype(int)
    curve = [curve[i] for i in picks]  # evenly spaced, first and last included
    codes = np.where(fixed, nearest, np.clip(base + (v >= 0), qmin, qmax))
    learned = layer_error((codes - z) * s - w, h) < layer_error((nearest - z) * s - w, h)
    codes = codes if learned else nearest
    if refine_sweeps:
        codes, moves = refine_codes(codes, w, h, s, z, qmin=qmin, qmax=qmax, sweeps=refine_sweeps)
        learned |= moves > 0
    return codes.astype(np.int64), curve, bool(learned)
