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
formed: preconditioned conjugate gradients runs on the calibration rows, each step two products
with the layer's inputs, from the current weights (a descent: the error never rises), with the
Kronecker factors of the unweighted problem (``XᵀX`` and each head's ``Q̃ᵀQ̃``) as preconditioner.
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
CHUNK_BYTES = 64 << 20  # scores (and their work arrays) of this many bytes at a time


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


@dataclass
class ScoreProblem:
    """The scores of one attention over the calibration data, as functions of one side's weights.

    ``inputs`` ``(R, K)``: the projection's rows (a ones column last when it has a bias), ``R = S · L``
    positions; ``other`` ``(S, H, L, d)``: the other side's heads times the scale; ``target`` and
    ``probabilities`` ``(S, H, L, L)``: the teacher's scores and attention. ``key``: the weights are
    the key projection's (scores are ``other · keysᵀ``), else the query's (``queries · otherᵀ``).
    """

    inputs: np.ndarray
    other: np.ndarray
    target: np.ndarray
    probabilities: np.ndarray
    key: bool

    def heads(self, weights: np.ndarray) -> np.ndarray:
        """This side's heads ``(S, H, L, d)`` under ``weights``."""
        s, h, length, size = self.other.shape
        return (self.inputs @ weights.astype(np.float32)).reshape(s, length, h, size).transpose(0, 2, 1, 3)

    def parts(self) -> list[slice]:
        """Sequences in chunks whose scores take at most ``CHUNK_BYTES``: the work arrays stay bounded."""
        s, h, length, _ = self.other.shape
        step = max(1, CHUNK_BYTES // (4 * h * length * length))
        return [slice(start, min(start + step, s)) for start in range(0, s, step)]

    def scores(self, heads: np.ndarray, part: slice) -> np.ndarray:
        """The scores of the sequences in ``part`` from this side's ``heads``."""
        other, mine = self.other[part], heads[part]
        return other @ mine.transpose(0, 1, 3, 2) if self.key else mine @ other.transpose(0, 1, 3, 2)

    def gradient(self, weights: np.ndarray, *, residual: bool = False) -> np.ndarray:
        """``Σ backᵀ F scores(W)``, the normal equations' operator on ``W`` (``residual``: of ``target − scores(W)``,
        their right-hand side less it)."""
        heads = self.heads(weights)
        pulled = np.empty(heads.shape, np.float32)
        for part in self.parts():
            errors = self.scores(heads, part)
            if residual:
                errors = np.subtract(self.target[part], errors, out=errors)
            weighted = fisher_weight(errors, self.probabilities[part], overwrite=True)
            pulled[part] = (weighted.transpose(0, 1, 3, 2) if self.key else weighted) @ self.other[part]
        s, h, length, size = heads.shape
        return (self.inputs.T @ pulled.transpose(0, 2, 1, 3).reshape(s * length, h * size)).astype(np.float64)

    def error(self, weights: np.ndarray) -> float:
        """``Σ δzᵀ F δz`` over every query row and head (all-zero weights: the reference that makes it relative)."""
        heads, total = self.heads(weights), 0.0
        for part in self.parts():
            errors = self.scores(heads, part) - self.target[part]
            total += float(np.vdot(errors, fisher_weight(errors.copy(), self.probabilities[part], overwrite=True)))
        return total

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(XᵀX, OₕᵀOₕ per head)``: the unweighted problem's Kronecker factors (sums: mergeable over shards)."""
        _, h, _, size = self.other.shape
        heads = self.other.astype(np.float64).transpose(1, 0, 2, 3).reshape(h, -1, size)
        return self.inputs.T.astype(np.float64) @ self.inputs, np.einsum("hrd,hre->hde", heads, heads)

    def fit(self, weights: np.ndarray, keep: np.ndarray, steps: int) -> np.ndarray:
        return conjugate_gradients(self, weights, keep, steps)


class Scores(Protocol):
    """What the solver needs of a score problem: :class:`ScoreProblem`, or its sums over calibration shards."""

    def gradient(self, weights: np.ndarray, *, residual: bool = False) -> np.ndarray: ...

    def error(self, weights: np.ndarray) -> float: ...

    def factors(self) -> tuple[np.ndarray, np.ndarray]: ...


def preconditioner(factors: tuple[np.ndarray, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``R ↦ (XᵀX)⁻¹ R (OₕᵀOₕ)⁻¹`` per head: the inverse of the unweighted problem's Kronecker factors."""
    left = _damped_inverse(factors[0])
    right = np.stack([_damped_inverse(f) for f in factors[1]])
    heads, size = right.shape[:2]

    def apply(residual: np.ndarray) -> np.ndarray:
        solved = (left @ residual).reshape(len(left), heads, size)
        return np.einsum("khd,hde->khe", solved, right).reshape(residual.shape)

    return apply


def conjugate_gradients(problem: Scores, weights: np.ndarray, keep: np.ndarray, steps: int) -> np.ndarray:
    """Preconditioned conjugate gradients on the Fisher-weighted score error from ``weights``; only entries
    where ``keep`` move. Each step lowers the error (the problem is a convex quadratic)."""
    precondition = preconditioner(problem.factors())
    x = np.array(weights, dtype=np.float64)  # entries outside ``keep`` stay: the residual never reaches them
    residual = problem.gradient(x, residual=True) * keep
    z = precondition(residual) * keep
    direction, rz = z, float(np.vdot(residual, z))
    for _ in range(steps):
        product = problem.gradient(direction) * keep
        curvature = float(np.vdot(direction, product))
        if not curvature > 0 or not rz > 0:
            break
        alpha = rz / curvature
        x = x + alpha * direction
        residual = residual - alpha * product
        z = precondition(residual) * keep
        rz, previous = float(np.vdot(residual, z)), rz
        direction = z + rz / previous * direction
    return x


def _damped_inverse(matrix: np.ndarray) -> np.ndarray:
    scale = float(np.mean(np.diag(matrix))) or 1.0
    return np.linalg.inv(matrix + PRECONDITIONER_DAMPING * scale * np.eye(len(matrix)))


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
    query's and the key's input rows ``(R, K)`` (a ones column last where the weights have a bias row)."""
    sequences, h, d = len(target), attention.heads, attention.head_size

    def problem(key: bool, other: np.ndarray) -> ScoreProblem:
        mine, theirs = (inputs[1], inputs[0]) if key else inputs
        heads = attention.scale * heads_of(theirs @ other.astype(np.float32), sequences, h, d)
        return ScoreProblem(mine, heads.astype(np.float32), target, probabilities, key)

    return problem


def refit_query_key(problem: Callable[[bool, np.ndarray], Scores], weights: tuple[np.ndarray, np.ndarray],
                    keep: tuple[np.ndarray, np.ndarray], steps: int) -> PairFit:
    """The key refit to the teacher's scores given the student's queries, then the query given the new keys.

    ``problem(key, other side's weights)``: the score problem of one side (:func:`local_scores`);
    ``weights`` ``(K, H·d)``, query's then key's; ``keep``: which weights may move.
    """
    keys = problem(True, weights[0])
    before = keys.error(weights[1])
    new_key = conjugate_gradients(keys, weights[1], keep[1], steps)
    queries = problem(False, new_key)
    new_query = conjugate_gradients(queries, weights[0], keep[0], steps)
    reference = queries.error(np.zeros_like(weights[0]))
    return PairFit(new_query, new_key, float(np.sqrt(before / reference)),
                   float(np.sqrt(queries.error(new_query) / reference)))
