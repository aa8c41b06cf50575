"""quantize-weights: weight-only int4/int8 block quantization into the ops onnxruntime runs fast.

Every MatMul / Gemm with a constant 2-D float weight becomes a ``com.microsoft.MatMulNBits``
(packed codes, per-block scales and zero points; a Gemm's ``alpha`` goes into the scales and its
bias ``beta * C`` into the bias input), and with ``embeddings`` every ``Gather`` on a constant
float table becomes a ``com.microsoft.GatherBlockQuantized`` (blocks along the embedding width),
at ``embedding_bits`` (default ``bits``; 8 keeps more of an LLM's logits for a little more file: a
table is read one row per token, so its bits cost file bytes, not memory traffic).
Activations stay float: the interface and the activation dtype never change.

Built for models bigger than memory: weights are read from external data one tensor at a time,
quantized in column chunks, and the packed results go straight to the spill file when the source
was external, so the pass holds one layer's working set, never the float model.

A weight read by several nodes is quantized once per layout (a tied embedding and LM head share
one quantization). A weight that any other op also reads, a weight that is an activation, a
Gemm with ``transA``, a weight of another dtype than float32/float16 and a Gemm whose run-time
bias it cannot carry are left float and counted (``skipped_<reason>``). A K that the block size
does not divide is padded with zero rows to whole blocks (``padded_k`` counts them), the layout
both ops define for it.

``method=gptq`` compensates each layer's rounding error with the input Hessian ``XᵀX`` of that
layer streamed from the calibration data (see :mod:`onnxopt.reconstruction`). ``rounding=learned``
keeps the block grid of round-to-nearest and learns, per weight, rounding down or up against the same
``XᵀX`` (AdaRound, :func:`~onnxopt.reconstruction.learned_rounding`, the solver ``quantize`` uses);
with ``method=gptq`` too, it takes GPTQ's grid and chooses floor or ceiling of GPTQ's compensated
weights. A layer keeps the nearest (or GPTQ's) codes where those have the smaller layer error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..blockquant import (GRIDS, BlockQuantized, NBitsWeight, grid_chooser, max_code, padded_blocks, quantize_blocks,
                          quantize_for_nbits)
from ..data import FeedSet
from ..embeddings import MS_DOMAIN, gather_block_quantized, table_data, table_zero_points
from ..errors import InputError
from ..graph import STANDARD_DOMAINS, GraphIndex, WeightStore, node_uses, unique_name_factory, value_shapes, walk_graphs
from ..reconstruction import SCHEDULES, LayerGeometry, LayerStatistics, Schedule, blas_threads, gptq, learned_rounding
from ..reconstruction.stream import input_statistics
from ..tensors import is_external, spill_tensor
from ..validate import Session
from .base import Pass, PassResult, count
from .weights import attribute

METHODS = ("rtn", "gptq")
ROUNDINGS = ("nearest", "learned")
REFINE_SWEEPS = 3  # exact one-step code moves after the learned rounding (minilm_l3: layer error -8 to -12 % vs GPTQ)
HESSIAN_BUDGET = 1 << 30  # bytes of XᵀX statistics held at once by GPTQ (more: another calibration run)
SUPPORTED_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(eq=False)
class _Use:
    """One node reading a weight; ``transposed``: the stored weight is ``(N, K)`` (Gemm transB, Gather)."""

    node: onnx.NodeProto
    transposed: bool


@dataclass(eq=False)
class _Weight:
    name: str
    uses: list[_Use] = field(default_factory=list)


def _weight_input(node: onnx.NodeProto) -> str:
    return node.input[0] if node.op_type == "Gather" else node.input[1]


class QuantizeWeights(Pass):
    name = "quantize-weights"
    summary = ("weight-only int4/int8 block quantization (RTN or GPTQ) of MatMul/Gemm and embedding tables "
               "into onnxruntime's MatMulNBits / GatherBlockQuantized")
    exact = False

    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        block_size: int = 32
        method: str = "rtn"
        symmetric: bool = False
        grid: str = "mse"
        embeddings: bool = True
        embedding_bits: int = 0  # tables read only by Gather (0: ``bits``); a table tied to a layer takes its bits
        accuracy_level: int = 0
        exclude: tuple[str, ...] = ()
        damping: float = 0.01
        rounding: str = "nearest"  # nearest | learned (AdaRound on the block grid; needs --calib)
        lr_schedule: str = "constant"  # learned rounding: cosine | step | exponential | constant
        rounding_steps: int = 100

        def __post_init__(self) -> None:
            if self.bits not in (4, 8):
                raise InputError(f"quantize-weights: bits must be 4 or 8, not {self.bits}")
            if self.embedding_bits not in (0, 4, 8):
                raise InputError(f"quantize-weights: embedding_bits must be 0 (as bits), 4 or 8, not {self.embedding_bits}")
            if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
                raise InputError(f"quantize-weights: block_size must be a power of two from 16 to 256 "
                                 f"(onnxruntime's kernels), not {self.block_size}")
            if self.method not in METHODS:
                raise InputError(f"quantize-weights: method must be one of {'|'.join(METHODS)}, not '{self.method}'")
            if self.grid not in GRIDS:
                raise InputError(f"quantize-weights: grid must be one of {'|'.join(GRIDS)}, not '{self.grid}'")
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise InputError(f"quantize-weights: accuracy_level must be 0..4, not {self.accuracy_level}")
            if not self.damping > 0:
                raise InputError(f"quantize-weights: damping must be > 0, not {self.damping}")
            if self.rounding not in ROUNDINGS or self.lr_schedule not in SCHEDULES or self.rounding_steps < 1:
                raise InputError(f"quantize-weights: rounding must be {'|'.join(ROUNDINGS)}, lr_schedule "
                                 f"{'|'.join(SCHEDULES)} and rounding_steps >= 1, not {self.rounding}, "
                                 f"{self.lr_schedule}, {self.rounding_steps}")

        @property
        def solved(self) -> bool:
            """Whether codes are solved against each layer's input statistics (calibration needed)."""
            return self.method == "gptq" or self.rounding == "learned"

    def requires(self, model: onnx.ModelProto) -> None:
        if self.options.solved:
            self.context.calibration_feeds(self.name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        stats: dict[str, int | float] = {"layers_quantized": 0, "embeddings_quantized": 0, "weights_quantized": 0}
        layers: list[dict] = []
        make_name = unique_name_factory(model)
        shapes = value_shapes(model)
        rewriters = [_GraphRewriter(graph, self.options, make_name, shapes, stats) for graph in walk_graphs(model.graph)]
        plans = [(rewriter, rewriter.eligible()) for rewriter in rewriters]
        errors = [0.0, 0.0]
        # inner graphs first: rebuilding an outer graph's nodes copies the subgraphs they hold
        for rewriter, weights in reversed(plans):
            gptq_top = self.options.solved and rewriter is rewriters[0]
            for group in _hessian_groups(rewriter, weights) if gptq_top else [weights]:
                hessians = self._hessians(model, rewriter, group, stats) if gptq_top else {}
                for weight in group:
                    for record in rewriter.quantize(weight, hessians):
                        layers.append(record)
                        errors[0] += record.pop("sq_error")
                        errors[1] += record.pop("sq_norm")
                del hessians
            rewriter.finish()
        changed = stats["layers_quantized"] + stats["embeddings_quantized"] > 0
        if changed and not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        if errors[1]:
            stats["weight_relative_error"] = float(np.sqrt(errors[0] / errors[1]))
        return PassResult(model, changed, stats, {"layers": layers})

    def _hessians(self, model: onnx.ModelProto, top: _GraphRewriter, weights: list[_Weight], stats
                  ) -> dict[str, np.ndarray]:
        """``XᵀX`` of every top-level layer input, from one streaming run over the calibration data.

        Layers reading the same value (q/k/v, gate/up) share one; sums are float64 and do not depend
        on how the data is batched. Layers inside subgraphs get none (they are rounded, and counted).
        """
        geometry: dict[str, LayerGeometry] = {}  # layer input -> its rows (features on the last axis)
        for weight in weights:
            dims = top.store.tensor(weight.name).dims
            for use in weight.uses:
                if use.node.op_type != "Gather":
                    geometry[use.node.input[0]] = LayerGeometry.linear(dims[1] if use.transposed else dims[0], 1)
        count(stats, "gptq_calibration_passes")
        feeds, executor = self.context.calibration_feeds(self.name), self.context.executor
        if executor is not None and isinstance(feeds, FeedSet) and len(feeds):  # each shard's sums on a worker
            statistics = input_statistics(model, feeds, geometry, bias=False, executor=executor)
            stats["gptq_calibration_samples"] = len(feeds)
            return {name: stat.hessian[0] for name, stat in statistics.items()}
        statistics = {name: LayerStatistics.empty(g) for name, g in geometry.items()}
        inputs = {v.name for v in model.graph.input}
        fetched = [name for name in statistics if name not in inputs]
        samples = 0
        with Session(model, extra_outputs=fetched, optimize=True) as session:
            for feed in self.context.calibration_feeds(self.name):
                values = {**session.run(feed, fetched), **{k: v for k, v in feed.items() if k in statistics}}
                for name, stat in statistics.items():
                    stat.update(geometry[name], values[name])
                samples += 1
        if not samples:
            raise InputError(f"quantize-weights: {'method=gptq' if self.options.method == 'gptq' else 'rounding=learned'}"
                             " got no calibration samples")
        stats["gptq_calibration_samples"] = samples
        return {name: stat.hessian[0] for name, stat in statistics.items()}


def _hessian_groups(rewriter: _GraphRewriter, weights: list[_Weight]) -> list[list[_Weight]]:
    """Consecutive weights whose layer inputs' ``XᵀX`` (float64) fit :data:`HESSIAN_BUDGET` together.

    Each group costs one calibration run and its statistics are dropped once its weights are
    quantized, so GPTQ's memory stays bounded whatever the model's depth (one group: one run).
    """
    groups: list[list[_Weight]] = [[]]
    held: dict[str, int] = {}
    for weight in weights:
        dims = rewriter.store.tensor(weight.name).dims
        needed = {u.node.input[0]: 8 * (dims[1] if u.transposed else dims[0]) ** 2
                  for u in weight.uses if u.node.op_type != "Gather"}
        new = {name: size for name, size in needed.items() if name not in held}
        if groups[-1] and sum(held.values()) + sum(new.values()) > HESSIAN_BUDGET:
            groups.append([])
            held, new = {}, needed
        groups[-1].append(weight)
        held.update(new)
    return groups


class _GraphRewriter:
    """Finds the quantizable weights of one graph and rewrites their readers; rebuilds the graph once."""

    def __init__(self, graph: onnx.GraphProto, options, make_name, shapes: dict[str, tuple], stats) -> None:
        self.graph, self.opt, self.make_name, self.shapes, self.stats = graph, options, make_name, shapes, stats
        self.store = WeightStore(graph)
        self.index = GraphIndex(graph)
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> its replacement
        self.touched: set[str] = set()  # constants that may have lost their last reader

    def eligible(self) -> list[_Weight]:
        """The weights to quantize, in graph order, each with all its readers; every other candidate counted."""
        weights: dict[str, _Weight] = {}
        for node in self.graph.node:
            use = self._use(node)
            if use is not None:
                name = _weight_input(node)
                weights.setdefault(name, _Weight(name)).uses.append(use)
        kept = []
        for weight in weights.values():
            readers = self.index.consumers.get(weight.name, [])
            if len(readers) != len(weight.uses) or self.index.is_graph_output(weight.name):
                count(self.stats, "skipped_weight_has_other_uses", len(weight.uses))
                continue
            if len(weight.uses) > 1:
                count(self.stats, "shared_weight_uses", len(weight.uses))
            kept.append(weight)
        return kept

    def _use(self, node: onnx.NodeProto) -> _Use | None:
        """How ``node`` reads a quantizable weight, or None (a MatMul / Gemm / Gather that cannot is counted)."""
        if node.domain not in STANDARD_DOMAINS or node.op_type not in ("MatMul", "Gemm", "Gather"):
            return None
        gather = node.op_type == "Gather"
        if gather and not self.opt.embeddings:
            return None
        weight = _weight_input(node)
        if weight not in self.store:
            if not gather:
                count(self.stats, "skipped_weight_not_constant")
            return None
        tensor = self.store.tensor(weight)
        reason = None
        if len(tensor.dims) != 2:
            reason = "weight_not_2d"
        elif tensor.data_type not in SUPPORTED_DTYPES:
            reason = "unsupported_dtype"
        elif any(fnmatch.fnmatchcase(n, p) for p in self.opt.exclude for n in (weight, node.name)):
            reason = "excluded"
        elif gather and attribute(node, "axis", 0) not in (0, -2):
            reason = "gather_axis_not_0"
        elif node.op_type == "Gemm" and attribute(node, "transA", 0):
            reason = "gemm_trans_a"
        elif node.op_type == "MatMul" and len(self.shapes.get(node.input[0]) or (0, 0)) < 2:
            reason = "matmul_input_not_2d"
        elif node.op_type == "Gemm" and not self._bias_expressible(node):
            reason = "gemm_runtime_bias_with_beta"
        if reason:
            count(self.stats, f"skipped_{reason}")
            return None
        return _Use(node, gather or (node.op_type == "Gemm" and bool(attribute(node, "transB", 0))))

    def _bias_expressible(self, node: onnx.NodeProto) -> bool:
        bias = node.input[2] if len(node.input) > 2 else ""
        return not bias or bias in self.store or attribute(node, "beta", 1.0) == 1.0

    def quantize(self, weight: _Weight, hessians: dict[str, np.ndarray]) -> list[dict]:
        """Quantize ``weight`` once per layout its readers need and rewrite every reader.

        With GPTQ a layout's Hessian is the sum over its MatMul / Gemm readers' inputs (a tied
        embedding table takes the codes its LM head chose); without any, the weight is rounded.
        """
        source = self.store.tensor(weight.name)
        spill = is_external(source)
        array = self.store.array(weight.name)
        dtype = SUPPORTED_DTYPES[source.data_type]
        forms: dict[bool, NBitsWeight] = {}
        records = []
        for transposed in sorted({u.transposed for u in weight.uses}):
            kn = array.T if transposed else array
            found = [hessians[u.node.input[0]] for u in weight.uses
                     if u.transposed == transposed and u.node.input[0] in hessians]
            solved = self._solve(kn, sum(found), dtype) if found else None
            if self.opt.solved and solved is None and any(u.node.op_type != "Gather" for u in weight.uses):
                count(self.stats, "gptq_rounded_without_statistics" if self.opt.method == "gptq"
                      else "rounding_nearest_without_statistics")
            tables_only = all(u.node.op_type == "Gather" for u in weight.uses if u.transposed == transposed)
            bits = self.opt.embedding_bits if tables_only and self.opt.embedding_bits else self.opt.bits
            forms[transposed] = quantize_for_nbits(kn, bits, self.opt.block_size, self.opt.symmetric,
                                                   self.opt.grid, solved, dtype)
            q = forms[transposed]
            if q.k % self.opt.block_size:
                count(self.stats, "padded_k")
            records.append({"name": weight.name, "K": q.k, "N": q.n, "ops": sorted({u.node.op_type for u in weight.uses
                                                                                  if u.transposed == transposed}),
                            "relative_error": float(np.sqrt(q.sq_error / q.sq_norm)) if q.sq_norm else 0.0,
                            "sq_error": q.sq_error, "sq_norm": q.sq_norm,
                            **({"loss_curve": solved.loss_curve} if solved is not None and solved.loss_curve else {})})
            self.stats["weights_quantized"] += array.size
        del array
        shared: dict[tuple, str] = {}

        def initializer(key: tuple, base: str, make) -> str:
            """One tensor per distinct content (``key``), spilled to disk when the weight came from disk."""
            if key not in shared:
                tensor = make(self.make_name(f"{weight.name}_{base}"))
                if spill:
                    spill_tensor(tensor)
                self.graph.initializer.append(tensor)
                shared[key] = tensor.name
            return shared[key]

        for use in weight.uses:
            q = forms[use.transposed]
            if use.node.op_type == "Gather":
                self._gather(use.node, q, dtype, initializer)
                self.stats["embeddings_quantized"] += 1
            else:
                self._matmul(use.node, q, dtype, initializer)
                self.stats["layers_quantized"] += 1
        self.touched.add(weight.name)
        return records

    def _solve(self, kn: np.ndarray, hessian: np.ndarray, dtype) -> BlockQuantized:
        """Codes of a ``(K, N)`` weight solved against its input statistics (GPTQ or learned rounding);
        K is padded to whole blocks with zero rows (their inputs are 0)."""
        k, n = kn.shape
        padded = padded_blocks(np.asarray(kn, dtype=np.float64), self.opt.block_size).reshape(-1, n)
        extra = len(padded) - k
        if extra:
            hessian = np.pad(hessian, ((0, extra), (0, extra)))
        if self.opt.method == "rtn":  # learned rounding on nearest rounding's grid (scales as the runtime stores them)
            grid = quantize_blocks(padded.astype(np.float32), self.opt.bits, self.opt.block_size, self.opt.symmetric,
                                   self.opt.grid, dtype)  # float32: the very grid nearest rounding picks
            return self._learned(padded, hessian, grid, padded, k)
        updated = np.empty_like(padded) if self.opt.rounding == "learned" else None
        solved = self._gptq(padded, hessian, k, updated)
        if updated is None:
            return solved
        # start at GPTQ's choice between the floor and ceiling of its compensated weight, barely soft
        block = self.opt.block_size
        scale = np.repeat(solved.scales, block, axis=0).astype(np.float64)
        zero = np.repeat(solved.zero_points, block, axis=0).astype(np.float64)
        codes = solved.codes.astype(np.float64)
        above = codes > updated / np.where(scale == 0, 1.0, scale) + zero
        start = (codes + np.where(above, -0.05, 0.05) - zero) * scale
        return self._learned(padded, hessian, solved, start, k)

    def _learned(self, padded: np.ndarray, hessian: np.ndarray, grid: BlockQuantized, start: np.ndarray, k: int
                 ) -> BlockQuantized:
        """Codes on ``grid``'s scales learned against ``XᵀX``, each the floor or ceiling of ``start``;
        ``grid``'s own codes where they have the smaller layer error."""
        block = self.opt.block_size
        per_row = (np.repeat(grid.scales, block, axis=0), np.repeat(grid.zero_points, block, axis=0))
        with blas_threads(2.0 * len(padded) ** 2 * padded.shape[1]):
            codes, curve, learned = learned_rounding(
                padded, hessian, per_row[0], qmin=0, qmax=max_code(self.opt.bits), zero_point=per_row[1],
                schedule=Schedule(self.opt.lr_schedule, steps=self.opt.rounding_steps), start=start,
                fallback=grid.codes, refine_sweeps=REFINE_SWEEPS)
        count(self.stats, "rounding_learned" if learned else f"rounding_kept_{'nearest' if self.opt.method == 'rtn' else 'gptq'}")
        return BlockQuantized(codes.astype(np.uint8), grid.scales, grid.zero_points, grid.bits, block, k,
                              loss_curve=curve)

    def _gptq(self, padded: np.ndarray, hessian: np.ndarray, k: int, updated: np.ndarray | None) -> BlockQuantized:
        """GPTQ codes of a padded ``(K, N)`` weight (``updated``: see :func:`~onnxopt.reconstruction.gptq`)."""
        bits, block = self.opt.bits, self.opt.block_size
        n = padded.shape[1]
        with blas_threads(2.0 * len(padded) ** 2 * n):
            codes, scales, zero_points, damping = gptq(
                padded, hessian, maxq=max_code(bits), group_size=block,
                choose_grid=grid_chooser(bits, self.opt.symmetric, self.opt.grid), damping=self.opt.damping,
                updated=updated)
        self.stats["gptq_max_damping"] = max(self.stats.get("gptq_max_damping", 0.0), damping)
        count(self.stats, "gptq_layers")
        return BlockQuantized(codes.astype(np.uint8), scales.astype(np.float32), zero_points.astype(np.uint8),
                              bits, block, k)

    def _matmul(self, node: onnx.NodeProto, q: NBitsWeight, dtype, initializer) -> None:
        tag = f"q{q.bits}"
        b = initializer((id(q), "b"), tag, lambda name: numpy_helper.from_array(q.b, name))
        alpha = attribute(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
        scales = initializer((id(q), "scales", alpha), "scales",
                             lambda name: numpy_helper.from_array((q.scales * np.float32(alpha)).astype(dtype), name))
        inputs = [node.input[0], b, scales]
        if q.zero_points is not None:
            inputs.append(initializer((id(q), "zp"), "zero_points", lambda name: numpy_helper.from_array(q.zero_points, name)))
        after = []
        bias_name = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        output = node.output[0]
        if bias_name:
            self.touched.add(bias_name)
            beta = attribute(node, "beta", 1.0)
            bias = self.store.array(bias_name)
            if bias is not None and bias.size in (1, q.n) and bias.shape[-1:] in ((1,), (q.n,), ()):
                vector = np.broadcast_to((bias * beta).astype(dtype).reshape(-1), (q.n,))
                inputs += [""] * (5 - len(inputs)) + [self._new_tensor(f"{bias_name}_bias", vector)]
            else:  # a bias of the full (M, N) shape, or computed at run time (beta is 1 then): an Add after
                if bias is not None and beta != 1.0:
                    bias_name = self._new_tensor(f"{bias_name}_scaled", (bias * beta).astype(dtype))
                output = self.make_name(f"{output}_before_bias")
                after.append(helper.make_node("Add", [output, bias_name], [node.output[0]],
                                              name=self.make_name(f"{node.name or output}_bias")))
        attrs = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
        if self.opt.accuracy_level:
            attrs["accuracy_level"] = self.opt.accuracy_level
        nbits = helper.make_node("MatMulNBits", inputs, [output], domain=MS_DOMAIN,
                                 name=self.make_name(f"{node.name or output}_{tag}"), **attrs)
        self.replaced[id(node)] = [nbits, *after]

    def _gather(self, node: onnx.NodeProto, q: NBitsWeight, dtype, initializer) -> None:
        """``GatherBlockQuantized`` of the table ``(V, D)``: the ``(N, K)`` form of ``MatMulNBits`` is its rows."""
        data = initializer(("table",), "table_q", lambda name: table_data(q, self.opt.symmetric, name))
        scales = initializer((id(q), "scales", 1.0), "scales",  # shared with a tied MatMulNBits reader
                             lambda name: numpy_helper.from_array(q.scales.astype(dtype), name))
        zero_points = (initializer(("table_zp",), "table_zero_points", lambda name: table_zero_points(q, name))
                       if q.zero_points is not None else None)
        self.replaced[id(node)] = [gather_block_quantized(
            data, node.input[1], scales, zero_points, list(node.output),
            self.make_name(f"{node.name or node.output[0]}_q{q.bits}"), q.bits, q.block_size)]

    def _new_tensor(self, base: str, array: np.ndarray) -> str:
        name = self.make_name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def finish(self) -> None:
        """Put the new nodes in place and drop the float weights (and old biases) nothing reads any more."""
        if not self.replaced:
            return
        nodes = [n for node in self.graph.node for n in self.replaced.get(id(node), [node])]
        still_read = {name for node in nodes for name in node_uses(node)} | {o.name for o in self.graph.output}
        dead = {name for name in self.touched if name not in still_read}
        nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output and n.output[0] in dead)]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        kept = [t for t in self.graph.initializer if t.name not in dead]
        if len(kept) != len(self.graph.initializer):
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)
