"""Solvers on layer statistics: OBS sweeps (GPTQ quantization, SparseGPT pruning, masked refit) and ridge refit.

Weights are in ONNX MatMul layout, ``W (K inputs, N outputs)``, ``y = x W``; a layer's Hessian is
``H = XᵀX`` over its calibration rows. The OBS sweep (Frantar & Alistarh, GPTQ / SparseGPT) takes
one damped inverse-Hessian Cholesky factor ``U`` (``H⁻¹ = UᵀU``, upper) per layer and visits the
inputs in order: input ``k``'s row is replaced (rounded, or zeroed) and its error, scaled by
``1 / U[k, k]``, is spread over the rows not yet visited, so that they compensate; updates are
applied lazily in blocks of ``block`` rows (one matrix product per block).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import numpy as np

MAX_DAMPING_RAISES = 12  # each raise multiplies the damping by 10
THREADED_WORK = 2e10  # multiply-adds from which numpy's BLAS may use every thread


class SolverError(ValueError):
    """A solver's inputs do not fit (shapes, group sizes)."""


def damped_inverse_cholesky(hessian: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """``(U, damping_used)``: the upper factor of ``(H + λI)⁻¹ = UᵀU`` with ``λ = damping_used · mean(diag H)``.

    ``damping`` is raised tenfold until the factorisation succeeds (singular or ill-conditioned
    statistics: inputs that never vary, duplicated features); the value that worked is returned.
    An all-zero Hessian (no rows) damps against 1.
    """
    h = np.asarray(hessian, dtype=np.float64)
    scale = float(np.mean(np.diag(h))) if h.size else 1.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    eye = np.eye(len(h))
    used = damping
    for _ in range(MAX_DAMPING_RAISES):
        try:
            lower = np.linalg.cholesky(h + used * scale * eye)
            inverse_lower = np.linalg.solve(lower, eye)  # L⁻¹: H⁻¹ = L⁻ᵀ L⁻¹
            upper = np.linalg.cholesky(inverse_lower.T @ inverse_lower).T
            if np.all(np.isfinite(upper)):
                return upper, used
        except np.linalg.LinAlgError:
            pass
        used = used * 10 if used > 0 else 1e-6
    raise SolverError(f"the layer statistics stay singular even with damping {used / 10:g} x mean(diag)")


RowStep = Callable[[int, int, np.ndarray, np.ndarray], np.ndarray]


def obs_sweep(weight: np.ndarray, upper: np.ndarray, step: RowStep, block: int = 128) -> np.ndarray:
    """Visit rows in order; ``step(k, i, W1, U1)`` returns the replacement of row ``k`` (row ``i`` of the
    current block ``W1``, already updated by every earlier replacement; ``U1`` the block's factor).

    Returns the replaced weights; the error of each replacement is compensated by the later rows.
    """
    w = np.array(weight, dtype=np.float64)
    rows = len(w)
    out = np.empty_like(w)
    for i1 in range(0, rows, block):
        i2 = min(i1 + block, rows)
        w1, u1 = w[i1:i2].copy(), upper[i1:i2, i1:i2]
        errors = np.empty_like(w1)
        for i in range(i2 - i1):
            q = step(i1 + i, i, w1, u1)
            err = (w1[i] - q) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], err)
            errors[i] = err
            out[i1 + i] = q
        w[i2:] -= upper[i1:i2, i2:].T @ errors
    return out


def gptq(weight: np.ndarray, hessian: np.ndarray, *, maxq: int, group_size: int,
         choose_grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], damping: float = 0.01,
         block: int = 128, updated: np.ndarray | None = None, act_order: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """GPTQ: round ``weight (K, N)`` onto a ``[0, maxq]`` grid per group of ``group_size`` inputs, compensating.

    ``choose_grid(rows (g, N))`` returns ``(scale (N,), zero_point (N,))`` for a group, from the rows
    as updated so far; a code ``q`` stands for ``(q - zero_point) * scale``. Returns
    ``(codes int64 (K, N), scales (K/g, N), zero_points (K/g, N), damping_used)``; ``updated`` (K, N),
    when given, receives each row as compensated just before it was rounded (where learned rounding starts).

    ``act_order`` (the reference's ``desc_act`` with ``static_groups``): rows are visited by descending
    ``diag(H)``, the inputs that carry the most signal first while every other row can still compensate them;
    each group's grid is then chosen up front from the weights as given, so a block's scale stays one grid
    whatever order its rows are visited in (the layout ``MatMulNBits`` needs). Codes come back in input order.
    """
    k, n = np.shape(weight)
    if group_size <= 0 or k % group_size:
        raise SolverError(f"gptq: group_size {group_size} must divide the {k} inputs")
    if np.shape(hessian) != (k, k):
        raise SolverError(f"gptq: hessian {np.shape(hessian)} does not match {k} inputs")
    groups = k // group_size
    codes = np.zeros((k, n), np.int64)
    scales = np.zeros((groups, n))
    zero_points = np.zeros((groups, n))
    order = np.arange(k)
    if act_order:  # static groups: each group's grid from the weights as given, before any compensation
        for g in range(groups):
            scales[g], zero_points[g] = choose_grid(np.asarray(weight[g * group_size: (g + 1) * group_size],
                                                               dtype=np.float64))
        order = np.argsort(-np.diag(hessian), kind="stable")
        weight, hessian = np.asarray(weight)[order], np.asarray(hessian)[np.ix_(order, order)]
    else:
        block = (block // group_size) * group_size if group_size <= block else group_size  # a group never spans blocks
    upper, used = damped_inverse_cholesky(hessian, damping)

    def step(row: int, i: int, w1: np.ndarray, _u1: np.ndarray) -> np.ndarray:
        source = order[row]
        g = source // group_size
        if not act_order and row % group_size == 0:
            scales[g], zero_points[g] = choose_grid(w1[i: i + group_size])
        scale, zero = scales[g], zero_points[g]
        if updated is not None:
            updated[source] = w1[i]
        q = np.clip(np.rint(np.divide(w1[i], scale, out=np.zeros(n), where=scale != 0)) + zero, 0, maxq)
        codes[source] = q
        return (q - zero) * scale

    obs_sweep(weight, upper, step, block)
    return codes, scales, zero_points, used


def _ranked_budgets(score: np.ndarray, target: int, block: int) -> list[int]:
    """Zeros per block of ``block`` rows: how many of the layer's ``target`` lowest scores each holds, never
    fewer than its weights already zero (scored ``-inf``)."""
    lowest = np.zeros(score.size, bool)
    if target > 0:
        lowest[np.argpartition(score.ravel(), target - 1)[:target]] = True
    lowest = lowest.reshape(score.shape) | np.isneginf(score)
    return [int(lowest[r: r + block].sum()) for r in range(0, len(score), block)]


def sparsegpt(weight: np.ndarray, hessian: np.ndarray, *, zeros: int | None = None, sparsity: float = 0.5,
              n_m: tuple[int, int] | None = None, damping: float = 0.01, block: int = 128, fixed_rows: int = 0,
              mask_block: int = 4) -> tuple[np.ndarray, float]:
    """SparseGPT: zero weights of ``weight (K, N)`` and update the survivors to compensate.

    Unstructured: exactly ``zeros`` weights (default ``round(sparsity · size)``) become zero, chosen
    every ``mask_block`` rows by the OBS saliency ``w² / U[k, k]²`` of the weights as updated so far
    (adaptive mask selection); how many in each such block comes from the same saliency over the
    whole layer before any update, so that sparsity may differ between inputs. Small mask blocks
    matter on small layers, where one 128-row block would fix the whole mask before any update
    (the sample transformer's 64-input layers: output cosine 0.9883 → 0.9900 after distill with 4).
    Weights already zero stay zero and count first.
    ``n_m = (N, M)`` keeps ``N`` of every ``M`` consecutive inputs per output instead. The last
    ``fixed_rows`` rows are never pruned but take compensation (a bias row, with a ones column in the
    Hessian: the bias absorbs the mean of what pruning removes); sizes and budgets count the rows
    before them. Returns ``(pruned weights, damping_used)``.
    """
    k, n = np.shape(weight)
    prunable = k - fixed_rows
    if np.shape(hessian) != (k, k):
        raise SolverError(f"sparsegpt: hessian {np.shape(hessian)} does not match {k} inputs")
    was_zero = np.asarray(weight) == 0
    was_zero[prunable:] = False
    upper, used = damped_inverse_cholesky(hessian, damping)
    pruned = np.zeros((k, n), bool)
    if n_m is not None:
        keep, group = n_m
        if prunable % group:
            raise SolverError(f"sparsegpt: {prunable} inputs are not divisible by M={group}")
        block = max(group, block - block % group)

        def step(row: int, i: int, w1: np.ndarray, u1: np.ndarray) -> np.ndarray:
            if row % group == 0 and row < prunable:
                score = w1[i: i + group] ** 2 / np.diag(u1)[i: i + group, None] ** 2
                score[was_zero[row: row + group]] = -np.inf
                drop = np.argsort(score, axis=0, kind="stable")[: group - keep]
                np.put_along_axis(pruned[row: row + group], drop, True, axis=0)
                pruned[row: row + group] |= was_zero[row: row + group]
            return np.where(pruned[row], 0.0, w1[i])
    else:
        target = int(math.floor(sparsity * prunable * n + 0.5)) if zeros is None else zeros
        block = max(mask_block, block - block % mask_block)  # mask blocks never span update blocks
        initial = np.asarray(weight[:prunable], dtype=np.float64) ** 2 / np.diag(upper)[:prunable, None] ** 2
        initial[was_zero[:prunable]] = -np.inf
        budgets = iter(_ranked_budgets(initial, target, mask_block))

        def step(row: int, i: int, w1: np.ndarray, u1: np.ndarray) -> np.ndarray:
            if i % mask_block == 0 and row < prunable:
                rows = min(mask_block, len(w1) - i, prunable - row)
                score = w1[i: i + rows] ** 2 / np.diag(u1)[i: i + rows, None] ** 2
                score[was_zero[row: row + rows]] = -np.inf
                flat = np.zeros(score.size, bool)
                budget = next(budgets)
                if budget:
                    flat[np.argpartition(score.ravel(), budget - 1)[:budget]] = True
                pruned[row: row + rows] = flat.reshape(score.shape)
            return np.where(pruned[row], 0.0, w1[i])

    return obs_sweep(weight, upper, step, block), used


def masked_refit(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, keep: np.ndarray | None,
                 damping: float, *, tolerance: float = 3e-3, max_iterations: int = 100) -> tuple[np.ndarray, float]:
    """Weights minimising ``|A W - Y|² + λ|W - start|²`` (from ``AᵀA``, ``AᵀY``), ``λ = damping · mean(diag AᵀA)``.

    Without ``keep``: one Cholesky solve for every column (damping raised if it fails). With ``keep``,
    entries outside it are zero and each column is solved over its kept rows: all columns at once
    by Jacobi-preconditioned conjugate gradients on the masked system (one ``K x K`` by ``K x N``
    product per iteration instead of one factorisation per column; ``λ > 0`` keeps it positive
    definite, so it converges). It stops when an iteration lowers the objective by less than
    ``tolerance`` of what all iterations gained so far, or after ``max_iterations``: the objective
    converges much faster than the residual (MiniLM's layers: within 1.5 % of the exact error in 10-20; its
    sentence cosine after SparseGPT + distill is the same to 1e-4 as with ``tolerance=1e-3``). Columns with nothing kept stay as in ``start``. Returns ``(weights, damping_used)``.

    Stacks (``gram (G, K, K)``, the others ``(G, K, N)``: a grouped Conv's groups) are independent
    problems solved together, each with its own ``λ`` and stop (a depthwise layer's hundreds of tiny
    systems in one loop); the damping returned is the largest used.
    """
    if np.ndim(gram) == 2:
        solved, used = masked_refit(np.asarray(gram)[None], np.asarray(cross)[None], np.asarray(start)[None],
                                    None if keep is None else np.asarray(keep)[None], damping,
                                    tolerance=tolerance, max_iterations=max_iterations)
        return solved[0], used
    gram = np.asarray(gram, dtype=np.float64)
    scale = np.mean(np.diagonal(gram, axis1=1, axis2=2), axis=1) if gram.shape[1] else np.ones(len(gram))
    scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)[:, None, None]
    eye = np.eye(gram.shape[1])
    if keep is None:
        if len(gram) > 1:  # together when no group needs its damping raised
            with contextlib.suppress(np.linalg.LinAlgError):
                lower = np.linalg.cholesky(gram + damping * scale * eye)
                return _cholesky_solve(lower, cross + damping * scale * start), damping
        solved, used = np.empty_like(np.asarray(cross, dtype=np.float64)), damping
        for group in range(len(gram)):
            solved[group], group_used = _damped_solve(gram[group], cross[group], start[group], damping,
                                                      float(scale[group, 0, 0]), eye)
            used = max(used, group_used)
        return solved, used
    lam = damping * scale
    # the iteration in float32 (products and updates): twice the speed, its rounding far below the fit's noise
    h = (gram + lam * eye).astype(np.float32)
    mask = keep.astype(np.float32)
    x = (start * keep).astype(np.float32)
    residual = ((cross + lam * start) * keep).astype(np.float32) - (h @ x) * mask
    diagonal = np.diagonal(h, axis1=1, axis2=2)[:, :, None].copy()
    z = residual / diagonal
    direction = z.copy()
    rz = np.einsum("gij,gij->gj", residual, z, dtype=np.float64)
    gained = np.zeros(len(h))
    active = np.ones(len(h), bool)
    for _ in range(max_iterations):
        hp = h @ direction
        hp *= mask
        alpha = rz / np.maximum(np.einsum("gij,gij->gj", direction, hp, dtype=np.float64), 1e-300)
        alpha[~active] = 0.0  # a group that has stopped keeps its weights
        x += alpha.astype(np.float32)[:, None] * direction
        residual -= alpha.astype(np.float32)[:, None] * hp
        step = np.einsum("gj,gj->g", alpha, rz) / 2  # how much each objective fell in this iteration
        gained += step
        active &= step > tolerance * gained
        if not active.any():
            break
        z = residual / diagonal
        rz_next = np.einsum("gij,gij->gj", residual, z, dtype=np.float64)
        direction = z + (rz_next / np.maximum(rz, 1e-300)).astype(np.float32)[:, None] * direction
        rz = rz_next
    dead = ~keep.any(axis=1, keepdims=True)
    return np.where(dead, start, x.astype(np.float64)), damping


def _cholesky_solve(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``(L Lᵀ)⁻¹ rhs`` for stacks of lower factors."""
    return np.linalg.solve(np.swapaxes(lower, -1, -2), np.linalg.solve(lower, rhs))


def _damped_solve(gram: np.ndarray, cross: np.ndarray, start: np.ndarray, damping: float, scale: float,
                  eye: np.ndarray) -> tuple[np.ndarray, float]:
    """One ridge solve toward ``start``, the damping raised tenfold until the factorisation succeeds."""
    used = damping
    for _ in range(MAX_DAMPING_RAISES):
        try:
            return _cholesky_solve(np.linalg.cholesky(gram + used * scale * eye), cross + used * scale * start), used
        except np.linalg.LinAlgError:
            used *= 10
    raise SolverError("masked_refit: the statistics stay singular")


@contextlib.contextmanager
def blas_threads(flops: float):
    """Limit numpy's BLAS to one thread unless a problem is large (≥ ``THREADED_WORK`` multiply-adds):
    smaller ones gain less from threads than they lose when the cores are busy (measured on a loaded
    2-core machine: MiniLM's distill 22 s with one thread, 43 s with two at a 5e8 threshold)."""
    if flops >= THREADED_WORK:
        yield
        return
    with _thread_pools().limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _thread_pools():
    """The loaded thread pools, found once: a fresh search costs ~0.5 ms, a limit through it 4 µs
    (PaddleOCR's classifier has 54 layers, its fp32 pass takes 0.15 s)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
