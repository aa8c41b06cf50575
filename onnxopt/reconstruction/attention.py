"""Attention-aware reconstruction: refit a query / key projection pair so that the attention scores match.

A per-layer fit matches each projection's own output, but the error that counts goes through
``Q Kᵀ`` and the softmax: a query error along a direction the keys never take costs nothing, and
a key can compensate what the (pruned) query lost. Given the student's query heads ``Q̃``, the key
projection's weights ``W`` enter the scores linearly, ``Z = c · Q̃ (X W)ᵀ`` per head, so matching
the teacher's scores ``Z*`` is a least-squares problem in ``W`` (zeros kept); the same holds for
the query given the keys. The error is measured in the softmax's own metric, the Fisher information
of each query's attention row ``p`` (the teacher's): ``δzᵀ (diag p − p pᵀ) δz``, the second-order
KL divergence between the teacher's and the student's attention. It ignores a constant shift of a
row (which the softmax ignores: the key bias drops out) and positions the mask hides (``p ≈ 0``).

The normal equations are a sum of Kronecker products over every query (``q qᵀ ⊗ Xᵀ F X``, of size
``(inputs · head size)²`` per head: 12k² for a 384-wide layer with 32-dim heads), so they are not
formed: flexible preconditioned conjugate gradients runs on the calibration rows, each step two products
with the layer's inputs, from the current weights (a descent: the error never rises). The preconditioner
is the unweighted problem's Kronecker factors (``XᵀX`` and each head's ``OₕᵀOₕ``) solved *over the kept
weights* by an inner iteration: half the weights are pruned zeros, and the plain Kronecker inverse,
masked afterwards, barely moves the error (minilm_l3: 10 steps of it reached what 1 step reaches now).
Key positions no query attends to (padding) weigh nothing, so the key side leaves their rows out.
Scores are worked on in chunks of sequences (``CHUNK_BYTES``); what is held is the teacher's scores
and probabilities, ``2 · S · H · L²`` floats (minilm_l3's 128 calibration sentences: 50 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from ..graph import STANDARD_DOMAINS, ConstantResolver, GraphIndex

PRECONDITIONER_DAMPING = 1e-3  # relative to the mean diagonal of each Kronecker factor
PRECONDITIONER_ITERATIONS = 40  # inner conjugate-gradient iterations per application of the preconditioner
STOP_GAIN = 0.05  # a step that gains less than this share of the steps' total gain is the last
SOLVED = 1e-10  # the preconditioner's inner iteration stops once its residual norm² is this share of the start's
HIDDEN = 1e-6  # a key position no query of any head attends to above this weighs nothing (padding)
CHUNK_BYTES = 64 << 20  # scores (and their work arrays) of this many bytes at a time
PARTS = 16  # chunks of sequences at least (each as long as its longest: fewer keys where sequences are padded)


@dataclass(frozen=True)
class AttentionScores:
    """``softmax(c · Q Kᵀ + mask)`` found in a graph: the projections feeding it and how heads are laid out.

    ``query`` / ``key`` name the projection outputs (after their bias), whose last axis splits into
    ``heads × head_size`` and whose rows, in order, are the positions of each sequence; ``scores`` is
    the ``Q·Kᵀ`` MatMul's output (``scale`` times the per-head products), ``probabilities`` the Softmax's.
    """

    query: str
    key: str
    scores: str
    probabilities: str
    heads: int
    head_size: int
    scale: float


def find_attention(index: GraphIndex, constants: ConstantResolver, projections: dict[str, int]
                   ) -> list[AttentionScores]:
    """Every ``Softmax(c2 · MatMul(Q, Kᵀ) [+ mask])`` over the last axis whose operands come from two of the
    ``projections`` (output name: width) through a Reshape that splits the last axis into heads, Transposes to ``(.., H, L, d)``
    and ``(.., H, d, L)``, and scalar Mul / Div (and Identity), each value read by the next node alone."""
    found = []
    for node in index.nodes:
        if node.op_type != "MatMul" or node.domain not in STANDARD_DOMAINS:
            continue
        query = _head_path(node.input[0], index, constants, projections, key=False)
        key = _head_path(node.input[1], index, constants, projections, key=True)
        if query is None or key is None or query[0] == key[0] or query[1:3] != key[1:3]:
            continue
        probabilities = _softmax_after(node.output[0], index, constants, rank=query[4])
        if probabilities is not None:
            found.append(AttentionScores(query[0], key[0], node.output[0], probabilities, query[1], query[2],
                                         query[3] * key[3]))
    return found


def _only_reader(name: str, index: GraphIndex) -> onnx.NodeProto | None:
    readers = index.consumer_nodes(name)
    return readers[0] if len(readers) == 1 and not index.is_graph_output(name) else None


def _scalar(name: str, constants: ConstantResolver) -> float | None:
    value = constants.value(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.dtype.kind == "f" else None


def _scaled_input(node: onnx.NodeProto, name: str, constants: ConstantResolver) -> tuple[str, float] | None:
    """A Mul / Div of a run-time value by a scalar constant: (the run-time input, the factor); else None."""
    if node.op_type == "Mul":
        for a, b in (node.input, node.input[::-1]):
            factor = _scalar(b, constants)
            if factor is not None and (name is None or a == name):
                return a, factor
    if node.op_type == "Div":
        factor = _scalar(node.input[1], constants)
        if factor:
            return node.input[0], 1.0 / factor
    return None


def _head_path(name: str, index: GraphIndex, constants: ConstantResolver, projections: dict[str, int], *, key: bool
               ) -> tuple[str, int, int, float, int] | None:
    """``(projection, heads, head size, scale, rank)`` when ``name`` is a projection's output split into heads,
    laid out ``(.., H, L, d)`` (``key``: ``(.., H, d, L)``); else None."""
    order: list[int] | None = None  # axes of the MatMul operand, as axes of the value reached so far
    scale, split = 1.0, None
    while True:
        if _only_reader(name, index) is None:  # another reader would feel a change made for the scores
            return None
        if name in projections and split is not None:
            break
        node = index.producer_node(name)
        if node is None or node.domain not in STANDARD_DOMAINS:
            return None
        scaled = (node.input[0], 1.0) if node.op_type == "Identity" else _scaled_input(node, None, constants)
        if scaled is not None:
            name, scale = scaled[0], scale * scaled[1]
        elif node.op_type == "Transpose" and split is None:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if not perm:
                return None
            order = [perm[a] for a in (order if order is not None else range(len(perm)))]
            name = node.input[0]
        elif node.op_type == "Reshape" and split is None:
            target = constants.value(node.input[1]) if len(node.input) > 1 else None
            if target is None or len(target) < 3 or 0 in target[-2:] or min(target[-2:]) < -1:
                return None
            split = (int(target[-2]), int(target[-1]), len(target))
            name = node.input[0]
        else:
            return None
    heads, size, rank = split
    width = projections[name]
    heads, size = (width // size, size) if heads == -1 else (heads, width // heads) if size == -1 else (heads, size)
    if heads * size != width:
        return None
    lead = list(range(rank - 3))
    wanted = lead + ([rank - 2, rank - 1, rank - 3] if key else [rank - 2, rank - 3, rank - 1])
    if (order if order is not None else list(range(rank))) != wanted:
        return None
    return name, heads, size, scale, rank


def _softmax_after(scores: str, index: GraphIndex, constants: ConstantResolver, rank: int) -> str | None:
    """The Softmax output reached from ``scores`` through scalar Mul / Div, Add / Sub of a mask and Identity, over the
    last axis."""
    name = scores
    while True:
        node = _only_reader(name, index)
        if node is None or node.domain not in STANDARD_DOMAINS:
            return None
        if node.op_type == "Softmax":
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            return node.output[0] if axis is not None and axis % rank == rank - 1 else None
        if node.op_type == "Identity" or node.op_type in ("Add", "Sub") and list(node.input).count(name) == 1 and (
                node.op_type == "Add" or node.input[0] == name):
            name = node.output[0]
        elif node.op_type in ("Mul", "Div") and _scaled_input(node, name, constants) is not None:
            name = node.output[0]
        else:
            return None


def fisher_weight(errors: np.ndarray, probabilities: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """``(diag p − p pᵀ) δz = p ⊙ (δz − pᵀδz)`` for every attention row: the softmax's sensitivity to a change
    of its input (``overwrite``: in the errors' own memory)."""
    mean = np.einsum("...j,...j->...", probabilities, errors)[..., None]
    weighted = np.subtract(errors, mean, out=errors if overwrite else None)
    return np.multiply(weighted, probabilities, out=weighted)


def visible_keys(probabilities: np.ndarray) -> np.ndarray:
    """``(S, L)``: the key positions some query of some head attends to (above ``HIDDEN``); the others
    (padding behind an additive mask) weigh nothing in the Fisher metric."""
    return probabilities.max(axis=(1, 2)) > HIDDEN


def key_extents(visible: np.ndarray) -> np.ndarray:
    """``(S,)``: how many key positions each sequence needs, up to its last visible one (all when none is)."""
    return visible.shape[1] - np.argmax(visible[:, ::-1], axis=1)


@dataclass
class ScoreProblem:
    """The scores of one attention over the calibration data, as functions of one side's weights.

    ``inputs`` ``(R, K)``: the projection's rows (a ones column last when it has a bias), ``R = S · L``
    positions, or only those at ``positions`` (indices into them; the others' heads are zero); ``other``
    ``(S, H, L, d)``: the other side's heads times the scale; ``target`` and ``probabilities``
    ``(S, H, L, L)``: the teacher's scores and attention; ``visible`` ``(S, L)``: the key positions that
    count (:func:`visible_keys`). ``key``: the weights are the key projection's (scores are
    ``other · keysᵀ``), else the query's (``queries · otherᵀ``).
    """

    inputs: np.ndarray
    other: np.ndarray
    target: np.ndarray
    probabilities: np.ndarray
    key: bool
    positions: np.ndarray | None = None
    visible: np.ndarray | None = None

    def heads(self, weights: np.ndarray) -> np.ndarray:
        """This side's heads ``(S, H, L, d)`` under ``weights``."""
        s, h, length, size = self.other.shape
        rows = self.inputs @ weights.astype(np.float32)
        if self.positions is not None:
            rows, placed = np.zeros((s * length, h * size), np.float32), rows
            rows[self.positions] = placed
        return rows.reshape(s, length, h, size).transpose(0, 2, 1, 3)

    def parts(self) -> list[tuple[slice, int]]:
        """Sequences in chunks (about ``PARTS``, each's scores within ``CHUNK_BYTES``: the work arrays stay
        bounded), each with the key positions it needs: up to its last visible one. Sequences ordered by that
        (:func:`local_scores`) make the chunks tight: minilm_l3's scores are then half as many."""
        s, h, length, _ = self.other.shape
        step = max(1, min(CHUNK_BYTES // (4 * h * length * length), -(-s // PARTS)))
        extent = np.full(s, length) if self.visible is None else key_extents(self.visible)
        return [(slice(start, min(start + step, s)), int(extent[start: start + step].max()))
                for start in range(0, s, step)]

    def scores(self, heads: np.ndarray, part: slice, keys: int) -> np.ndarray:
        """The scores of the sequences in ``part`` from this side's ``heads``, for the first ``keys`` key positions."""
        other, mine = self.other[part], heads[part]
        if self.key:
            return other @ mine[:, :, :keys].transpose(0, 1, 3, 2)
        return mine @ other[:, :, :keys].transpose(0, 1, 3, 2)

    def _pulled(self, weights: np.ndarray, residual: bool) -> tuple[np.ndarray, float]:
        """``(Σ backᵀ F errors, Σ δzᵀ F δz)`` where the errors are ``scores(W)``, or with ``residual``
        ``target − scores(W)`` (the error is then that of ``W``'s scores)."""
        heads = self.heads(weights)
        pulled, error = np.zeros(heads.shape, np.float32), 0.0  # zero at hidden keys beyond a part's extent
        for part, keys in self.parts():
            errors = self.scores(heads, part, keys)
            if residual:
                errors = np.subtract(self.target[part, ..., :keys], errors, out=errors)
                before = errors.copy()
            weighted = fisher_weight(errors, self.probabilities[part, ..., :keys], overwrite=True)
            if residual:
                error += float(np.vdot(before, weighted))
            if self.key:
                pulled[part, :, :keys] = weighted.transpose(0, 1, 3, 2) @ self.other[part]
            else:
                pulled[part] = weighted @ self.other[part, :, :keys]
        s, h, length, size = heads.shape
        rows = pulled.transpose(0, 2, 1, 3).reshape(s * length, h * size)
        rows = rows[self.positions] if self.positions is not None else rows
        return (self.inputs.T @ rows).astype(np.float64), error

    def product(self, direction: np.ndarray) -> np.ndarray:
        """The normal equations' operator on a direction of the weights, ``Σ backᵀ F scores(D)``."""
        return self._pulled(direction, residual=False)[0]

    def residual(self, weights: np.ndarray) -> tuple[np.ndarray, float]:
        """The normal equations' residual at ``weights`` (right-hand side less the operator: the descent
        direction) and the error there, ``Σ δzᵀ F δz`` over every query row and head."""
        return self._pulled(weights, residual=True)

    def error(self, weights: np.ndarray) -> float:
        """``Σ δzᵀ F δz`` (all-zero weights: the reference that makes it relative; no product needed)."""
        heads, total = None if not np.any(weights) else self.heads(weights), 0.0
        for part, keys in self.parts():
            errors = -self.target[part, ..., :keys] if heads is None else (
                self.scores(heads, part, keys) - self.target[part, ..., :keys])
            total += float(np.vdot(errors, fisher_weight(errors.copy(), self.probabilities[part, ..., :keys],
                                                         overwrite=True)))
        return total

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(XᵀX, OₕᵀOₕ per head)``: the unweighted problem's Kronecker factors over the positions that
        count (the query side's key heads: the visible ones); sums, mergeable over shards."""
        _, h, _, size = self.other.shape
        other = self.other
        if not self.key and self.visible is not None:
            other = other * self.visible[:, None, :, None]
        heads = other.transpose(1, 0, 2, 3).reshape(h, -1, size)
        return ((self.inputs.T @ self.inputs).astype(np.float64),
                (heads.transpose(0, 2, 1) @ heads).astype(np.float64))

    def fit(self, weights: np.ndarray, keep: np.ndarray, steps: int, tolerance: float = STOP_GAIN) -> np.ndarray:
        return conjugate_gradients(self, weights, keep, steps, tolerance).weights


class Scores(Protocol):
    """What the solver needs of a score problem: :class:`ScoreProblem`, or its sums over calibration shards."""

    def product(self, direction: np.ndarray) -> np.ndarray: ...

    def residual(self, weights: np.ndarray) -> tuple[np.ndarray, float]: ...

    def error(self, weights: np.ndarray) -> float: ...

    def factors(self) -> tuple[np.ndarray, np.ndarray]: ...


def masked_preconditioner(factors: tuple[np.ndarray, np.ndarray], keep: np.ndarray, iterations: int
                          ) -> Callable[[np.ndarray], np.ndarray]:
    """``R ↦ Z`` solving the unweighted problem's Kronecker system over the kept weights,
    ``mask ⊙ (XᵀX Z Oₕᵀ Oₕ) = R`` per head, by ``iterations`` of Jacobi-preconditioned conjugate gradients
    (float32; one ``K × K`` by ``K × N`` product each). The Kronecker inverse itself, masked afterwards,
    ignores that half the weights cannot move: on minilm_l3 one outer step then gains a tenth of what it
    gains with the mask inside (keys' score error 0.0192 → 0.0184, against → 0.0115 with 40 iterations)."""
    left, right = (f + PRECONDITIONER_DAMPING * np.mean(np.diagonal(f, axis1=-2, axis2=-1), axis=-1)[..., None, None]
                   * np.eye(f.shape[-1]) for f in factors)
    heads, size = right.shape[:2]
    left32, right32, mask = left.astype(np.float32), right.astype(np.float32), keep.astype(np.float32)
    diagonal = (np.diag(left)[:, None] * np.diagonal(right, axis1=1, axis2=2).reshape(1, -1)).astype(np.float32)

    def operator(z: np.ndarray) -> np.ndarray:
        product = (left32 @ z).reshape(len(z), heads, size).transpose(1, 0, 2) @ right32
        return product.transpose(1, 0, 2).reshape(z.shape) * mask

    def apply(residual: np.ndarray) -> np.ndarray:
        rhs = residual.astype(np.float32) * mask
        solved, remaining = np.zeros_like(rhs), rhs
        z = remaining / diagonal
        direction, rz = z, float(np.vdot(remaining, z))
        converged = SOLVED * rz  # float32: beyond this the residual is rounding, and the steps would amplify it
        for _ in range(iterations):
            product = operator(direction)
            curvature = float(np.vdot(direction, product))
            if not curvature > 0 or not rz > converged:
                break
            alpha = rz / curvature
            solved += alpha * direction
            remaining = remaining - alpha * product
            z = remaining / diagonal
            rz, previous = float(np.vdot(remaining, z)), rz
            direction = z + rz / previous * direction
        return solved.astype(np.float64)

    return apply


@dataclass(frozen=True)
class Solved:
    """Weights from :func:`conjugate_gradients`, the error at the start and after (as tracked by the steps)."""

    weights: np.ndarray
    error_before: float
    error_after: float


def conjugate_gradients(problem: Scores, weights: np.ndarray, keep: np.ndarray, steps: int,
                        tolerance: float = STOP_GAIN) -> Solved:
    """Flexible preconditioned conjugate gradients on the Fisher-weighted score error from ``weights``; only
    entries where ``keep`` move. Each step is an exact line search along a direction conjugate to the last
    (Polak–Ribière: the preconditioner is itself an inner iteration), so the error never rises and each
    step's gain, ``(rᵀd)² / dᵀAd``, is known without evaluating it. Stops after ``steps`` or when a step
    gains less than ``tolerance`` of what the steps so far gained together."""
    precondition = masked_preconditioner(problem.factors(), keep, PRECONDITIONER_ITERATIONS)
    x = np.array(weights, dtype=np.float64)  # entries outside ``keep`` stay: the residual never reaches them
    residual, error = problem.residual(x)
    residual *= keep
    z = precondition(residual)
    direction, rz, gained = z, float(np.vdot(residual, z)), 0.0
    for step in range(steps):
        product = problem.product(direction) * keep
        curvature, slope = float(np.vdot(direction, product)), float(np.vdot(residual, direction))
        if not curvature > 0 or not slope > 0:
            break
        alpha = slope / curvature
        x += alpha * direction
        residual -= alpha * product
        gain = alpha * slope
        gained += gain
        if gain < tolerance * gained or step == steps - 1:
            break
        z_next = precondition(residual)
        rz_next = float(np.vdot(residual, z_next))
        if not rz_next > 0:  # solved (to rounding)
            break
        beta = max(0.0, (rz_next - float(np.vdot(residual, z))) / rz)
        direction, z, rz = z_next + beta * direction, z_next, rz_next
    return Solved(x, error, max(error - gained, 0.0))


def heads_of(rows: np.ndarray, sequences: int, heads: int, size: int) -> np.ndarray:
    """``(R, H·d)`` projection rows as ``(S, H, L, d)`` heads."""
    return rows.reshape(sequences, -1, heads, size).transpose(0, 2, 1, 3)


@dataclass(frozen=True)
class PairFit:
    """Refit query and key weights and the Fisher-weighted score error before and after (relative)."""

    query: np.ndarray
    key: np.ndarray
    error_before: float
    error_after: float


def layout_matches(attention: AttentionScores, queries: np.ndarray, keys: np.ndarray, target: np.ndarray) -> bool:
    """Whether the teacher's projection rows ``(R, H·d)``, split into heads as found, give its scores
    ``(S, H, L, L)`` (checked on the first sequence): the graph was read right."""
    sequences, length = len(target), target.shape[-1]
    if any(len(rows) != sequences * length for rows in (queries, keys)) or target.shape[-2] != length:
        return False
    h, d = attention.heads, attention.head_size
    first = attention.scale * heads_of(queries, sequences, h, d)[:1] @ heads_of(keys, sequences, h, d)[:1].transpose(
        0, 1, 3, 2)
    return bool(np.linalg.norm(first - target[:1]) <= 1e-3 * (np.linalg.norm(target[:1]) + 1e-30))


def local_scores(attention: AttentionScores, inputs: tuple[np.ndarray, np.ndarray], target: np.ndarray,
                 probabilities: np.ndarray) -> Callable[[bool, np.ndarray], ScoreProblem]:
    """``(key, the other side's weights) -> ScoreProblem`` over one set of calibration rows: ``inputs`` are the
    query's and the key's input rows ``(R, K)`` (a ones column last where the weights have a bias row). The key
    side keeps only the rows of visible keys (:func:`visible_keys`): minilm_l3's padding is half its rows."""
    sequences, h, d = len(target), attention.heads, attention.head_size
    visible = visible_keys(probabilities)
    length = visible.shape[1]
    order = np.argsort(key_extents(visible), kind="stable")
    if np.any(order != np.arange(sequences)):  # a sum over sequences: their order is free
        visible, target, probabilities = visible[order], target[order], probabilities[order]
        ordered = {id(rows): rows.reshape(sequences, length, -1)[order].reshape(rows.shape) for rows in inputs}
        inputs = tuple(ordered[id(rows)] for rows in inputs)
    positions = np.flatnonzero(visible)
    compact = len(positions) < visible.size
    keys = inputs[1][positions] if compact else inputs[1]

    def problem(key: bool, other: np.ndarray) -> ScoreProblem:
        if key:  # the query heads, every row
            rows = inputs[0] @ other.astype(np.float32)
        else:  # the key heads, zero where hidden
            rows = np.zeros((visible.size, other.shape[1]), np.float32)
            rows[positions] = keys @ other.astype(np.float32)
        heads = np.ascontiguousarray(attention.scale * heads_of(rows, sequences, h, d), dtype=np.float32)
        if key:
            return ScoreProblem(keys, heads, target, probabilities, True, positions if compact else None, visible)
        return ScoreProblem(inputs[0], heads, target, probabilities, False, None, visible)

    return problem


def refit_query_key(problem: Callable[[bool, np.ndarray], Scores], weights: tuple[np.ndarray, np.ndarray],
                    keep: tuple[np.ndarray, np.ndarray], steps: int) -> PairFit:
    """The key refit to the teacher's scores given the student's queries, then the query given the new keys.

    ``problem(key, other side's weights)``: the score problem of one side (:func:`local_scores`);
    ``weights`` ``(K, H·d)``, query's then key's; ``keep``: which weights may move. The errors come from
    the solves (each starts where the last ended); only the reference, all-zero scores, is evaluated.
    """
    keys = conjugate_gradients(problem(True, weights[0]), weights[1], keep[1], steps)
    queries = problem(False, keys.weights)
    query = conjugate_gradients(queries, weights[0], keep[0], steps)
    reference = queries.error(np.zeros_like(weights[0]))
    return PairFit(query.weights, keys.weights, float(np.sqrt(keys.error_before / reference)),
                   float(np.sqrt(query.error_after / reference)))
