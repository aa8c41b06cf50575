"""quantize: static int8 QDQ quantization that onnxruntime's CPU EP fuses into integer kernels.

Placement follows what onnxruntime's QDQ fusions need (checked on the optimized session graph):
- Conv / MatMul / Gemm: DequantizeLinear on int8 weights (per output channel; the float weight is
  replaced, so the file shrinks ~4x), int32 bias for Conv/Gemm, a Q/DQ pair on each activation
  input and on the output -> QLinearConv, QLinearMatMul, QGemm. A MatMul/Gemm whose consumers are
  all float gets no output pair: MatMulIntegerToFloat / QGemm give float directly (less error, faster).
- Relu / Clip(0, x) after such an op: the pair goes after the activation instead (uint8 zero point
  0), which onnxruntime folds away (Relu/Clip + QuantizeLinear fusion).
- MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze on a quantized tensor: the output gets
  the *same* scale and zero point, so onnxruntime runs them on int8 data (its DropQDQ rule).
- GlobalAveragePool, AveragePool on a quantized tensor: the output gets a Q/DQ pair with its own
  range -> QLinearGlobalAveragePool / QLinearAveragePool on int8 NHWC data (a float pool after a
  DQ would need the whole feature map transposed back to NCHW in float first).
Everything else stays float. Weights inside subgraphs (If/Loop bodies) get int8 + DQ as well
(weight-only: their activations cannot be observed from outside the body).

Ranges come from one streaming calibration pass (:mod:`onnxopt.calibration`): min/max, or a
histogram-based choice (percentile, entropy, mse). Bias correction removes the mean shift that
weight rounding causes, ``E[(Wq - W) x]``, using per-channel input means from the same pass.
``min_cosine`` measures each quantized layer alone on calibration data and keeps the most
sensitive ones in float until the whole model reaches the target.

Transformers (``mode``): a static range per activation tensor cannot follow LayerNorm and GELU
outputs whose outlier channels and per-sentence ranges vary, and activation-activation MatMuls
(attention scores, Softmax times V) lose most. ``mode=dynamic`` quantizes MatMul/Gemm with constant
weights as ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add bias)``, which
onnxruntime fuses into one DynamicQuantizeMatMul (each input's range is taken per run), keeps
activation-activation MatMuls, Softmax, LayerNorm, GELU and residual adds in float, migrates
activation outliers into the weights SmoothQuant-style where the statistics say it pays
(:mod:`onnxopt.smoothing`; the division is folded into the gamma and beta of a LayerNorm upstream
when nothing else reads its output, else an explicit Mul does it, ``smooth_mul``),
and bias-corrects the weight rounding. ``mode=auto`` (the default) builds the static model, the static one
with narrow Convs float (depthwise, 3-channel stems: onnxruntime's QLinearConv runs them slower than its
float NCHWc kernels, and the Q/DQ and layout transposes around them cost more), the dynamic one, and the
dynamic one with migration Muls, measures them on calibration samples (worst cosine to float, then warm
1-thread onnxruntime latency, interleaved) and keeps the fastest of those about as accurate as the most
accurate. Embedding tables
(``Gather`` on a big constant) become int8 per row (``embeddings``, :mod:`onnxopt.embeddings`):
the file shrinks by the vocabulary too. Residual Adds read by a LayerNormalization are written as
``Sum`` (``residual_sum``, :mod:`onnxopt.residual_sum`): onnxruntime would fuse each pair into its
SkipLayerNormalization, whose float CPU kernel runs 6x slower than the unfused pair.

``rounding=learned`` rounds each static or dynamic layer's int8 weight by learned rounding (AdaRound,
:mod:`onnxopt.reconstruction`) against the XᵀX of its input (for a smoothed dynamic layer, of the
smoothed input), from one more pass over the calibration data; it is never worse than nearest rounding
per layer. ``mode=auto`` and ``min_cosine`` decide with nearest rounding (their trials would otherwise
learn every candidate's weights); learned rounding then applies to the plan they chose. Weights inside
subgraphs and embedding tables keep nearest rounding (their inputs are not observed). The loss curves
go to ``details["loss_curves"]``.

The file: small float constants around the int8 weights are float16 (``float16_constants``; the 1-D ones
joined in one tensor behind one Cast and one Split, which onnxruntime folds at load), a LayerNorm's beta goes
into the biases of the layers that alone read it (``fold_norm_bias``), and the values the pass adds get the
shortest free names (``short_names``): 0.277x -> 0.269x of the sample transformer's fp32 file.

``PassResult.details["layers"]`` lists every quantized (or deliberately float) layer with its
mode, weight rounding error, smoothing and, where measured, the cosine with that layer alone
quantized: where the error comes from. ``details["candidates"]`` holds auto mode's measurements.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..calibration import TensorStats, collect, load_stats, model_fingerprint, save_stats
from ..data import ChainedRows, FeedSet
from ..embeddings import quantize_embeddings
from ..errors import InputError
from ..graph import (GraphIndex, WeightStore, filter_field, model_graphs, model_names, opset_version, replace_nodes,
                     shorten_names, unique_name_factory, walk_graphs)
from ..residual_sum import residual_adds_as_sum
from ..sharded import TrialScorer
from ..tensors import tensor_to_array
from ..smoothing import fold_inverse_scale, smoothing_scale
from ..validate import Session, Tolerances, compare_outputs, output_metrics, run_model, top1_counts
from .base import Pass, PassResult, count
from .bias_rewrite import fold_batchnorm, fold_norm_bias, fuse_bias
from ..reconstruction import SCHEDULES, LayerGeometry, LayerStatistics, Schedule, learned_rounding
from ..reconstruction.stream import input_statistics
from .weights import WeightUse, attribute, from_canonical, mean_contribution, to_canonical, weight_use

METHODS = ("minmax", "percentile", "entropy", "mse")
HEAVY = ("Conv", "MatMul", "Gemm")
PASS_THROUGH = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
AVERAGING = {"GlobalAveragePool", "AveragePool"}  # int8 in, own output range
QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
MODES = ("auto", "static", "dynamic")
# (bits, block_size) for onnxopt.embeddings; block_size 0: per row in standard ONNX ops, else GatherBlockQuantized
EMBEDDING_FORMATS = {"float": None, "int8": (8, 0), "int8_block128": (8, 128), "int4": (4, 32)}
AUTO_ERROR_SLACK = 1.5  # auto mode: a candidate within 1.5x the best (1 - worst cosine) counts as as accurate,
AUTO_ERROR_FLOOR = 1e-4  # and so does one within 1e-4 of it (both are then float-exact for any task)
AUTO_LATENCY_MARGIN = 0.03  # of those, the fastest; a simpler one within 3 % of it is kept (timing noise)
AUTO_TIMING_S = 0.6  # auto mode: each candidate is timed for at least this long (and latency_runs runs)
AUTO_LATENCY_QUANTILE = 25  # percentile of the interleaved runs: load on the machine only ever adds time
# runs per turn: a model timed right after another finds colder caches than a deployed one (one run per turn
# over four copies of digits_cnn measured 28.5/21.3/18.7/18.7 us by position; eight models per round made
# ppocr_cls's identical static models differ by 2x); short blocks: many turns, so load swings hit all alike
AUTO_LATENCY_BLOCK = 6
AUTO_MUL_TRIALS = 24  # auto mode: migration Muls tried without, one input tensor each (see _fewer_muls)
# spatial Conv with a reduction (input channels per group x kernel area) this small: onnxruntime's QLinearConv
# runs it slower than its float NCHWc kernels (depthwise 3x3 / 5x5, 3-channel stems: profiled on ppocr_cls,
# 1.4 of its 3.2 ms of QLinearConv), and the Q/DQ and NHWC transposes around it cost more; auto mode also
# measures a candidate that keeps them float
NARROW_CONV_REDUCTION = 32
# float16_constants: a constant is halved where that saves more than its Cast node costs (this many bytes and
# its name twice), and only where every reader is one of these (op, input positions), where 11 bits of mantissa
# are far below the int8 noise around them (None: any position)
HALF_CAST_BYTES = 32
HALF_READERS = {"Add": None, "Sub": None, "Mul": None, "Div": None, "LayerNormalization": (1, 2),
                "SkipLayerNormalization": (2, 3, 4), "InstanceNormalization": (1, 2), "Gemm": (2,), "Conv": (2,)}
# float16's normal range for a constant's largest value: every value then keeps an error <= 2^-11 of that value
# (or 2^-25 absolute in the subnormals, far below 2^-11 of the largest)
HALF_RANGE = (2.0**-14, 65504.0)
HOLDOUT_BLOCKS = 4  # learned rounding's held-out samples: tails of this many runs of the calibration data
HOLDOUT_MAX_SAMPLES = 256  # at most this many held out (the rest fit the statistics)


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "mse"
    per_channel: bool = True
    activation_type: str = "uint8"  # uint8 asymmetric | int8 symmetric
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI
    percentile: float = 99.999
    op_types: tuple[str, ...] = HEAVY
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    bias_correction: bool = True
    fold_batchnorm: bool = True
    fuse_bias: bool = True
    fold_norm_bias: bool = True  # a LayerNorm's beta into the biases of the MatMul/Gemm layers that alone read it
    min_cosine: float = 0.0  # > 0: accuracy-aware mode
    sensitivity_samples: int = 32
    batch_size: int = 0  # samples per calibration run; 0: joined automatically where the batch axis allows
    mode: str = "auto"  # static QDQ | dynamic int8 MatMul/Gemm | auto: both measured, see the module notes
    smooth: bool = True  # dynamic layers: SmoothQuant migration where the estimated error drops
    smooth_alpha: float = 0.0  # migration strength in (0, 1); 0: chosen per tensor from the statistics
    smooth_mul: bool = True  # also migrate where no LayerNorm upstream absorbs it (an explicit Mul at run time)
    embeddings: str = "int8"  # embedding tables: float | int8 (per row) | int8_block128 | int4: EMBEDDING_FORMATS
    latency_runs: int = 50  # auto mode: onnxruntime runs per candidate (at least), interleaved, 1 thread
    layer_sensitivity: bool = False  # report each layer's calibration cosine alone (min_cosine measures it anyway)
    rounding: str = "nearest"  # nearest | learned (AdaRound on each layer's input statistics)
    lr_schedule: str = "constant"  # learned rounding: cosine | step | exponential | constant
    rounding_steps: int = 100
    # learned rounding: this share of the calibration samples is held out of its statistics, and the learned
    # weights are kept only where they beat nearest rounding end to end on those samples (0: no check)
    rounding_holdout: float = 0.25
    float16_constants: bool = True  # small float constants (biases, norm parameters, scales) stored as float16
    short_names: bool = True  # the values the pass adds get the shortest free names (_0, _1, ...)
    # residual Adds read by a LayerNormalization written as Sum: onnxruntime then keeps the pair unfused instead of
    # its SkipLayerNormalization, whose float CPU kernel measured 6x slower (see onnxopt.residual_sum)
    residual_sum: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"quantize: method must be one of {'|'.join(METHODS)}, not '{self.method}'")
        if self.activation_type not in ("uint8", "int8"):
            raise InputError(f"quantize: activation_type must be uint8 or int8, not '{self.activation_type}'")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"quantize: percentile must be in (50, 100], not {self.percentile}")
        unknown = [t for t in self.op_types if t not in HEAVY]
        if unknown:
            raise InputError(f"quantize: op_types can hold {'|'.join(HEAVY)}, not {'|'.join(unknown)}")
        if not 0.0 <= self.min_cosine <= 1.0:
            raise InputError(f"quantize: min_cosine must be in [0, 1], not {self.min_cosine}")
        if self.sensitivity_samples < 1:
            raise InputError("quantize: sensitivity_samples must be at least 1")
        if self.batch_size < 0:
            raise InputError("quantize: batch_size must be at least 0 (0: automatic)")
        if self.mode not in MODES:
            raise InputError(f"quantize: mode must be one of {'|'.join(MODES)}, not '{self.mode}'")
        if not 0.0 <= self.smooth_alpha < 1.0:
            raise InputError(f"quantize: smooth_alpha must be in [0, 1) (0: automatic), not {self.smooth_alpha}")
        if self.embeddings not in EMBEDDING_FORMATS:
            raise InputError(f"quantize: embeddings must be one of {'|'.join(EMBEDDING_FORMATS)}, "
                             f"not '{self.embeddings}'")
        if self.latency_runs < 1:
            raise InputError("quantize: latency_runs must be at least 1")
        if self.rounding not in ("nearest", "learned") or self.lr_schedule not in SCHEDULES or self.rounding_steps < 1:
            raise InputError(f"quantize: rounding must be nearest|learned, lr_schedule {'|'.join(SCHEDULES)} and "
                             f"rounding_steps >= 1, not {self.rounding}, {self.lr_schedule}, {self.rounding_steps}")
        if not 0.0 <= self.rounding_holdout < 1.0:
            raise InputError(f"quantize: rounding_holdout must be in [0, 1) (0: no held-out check), "
                             f"not {self.rounding_holdout}")


@dataclass
class _Unit:
    """One quantizable heavy node: where its weight, bias and activations are."""

    node: onnx.NodeProto
    weight: str | None  # constant operand name (None: both operands are activations)
    axis: int | None  # per-channel axis of the weight
    activations: list[str]
    bias: str | None  # float bias to turn into int32 (Conv B, Gemm C)
    use: WeightUse | None  # the weight's layout when it is the second operand (bias correction needs it)
    output: str | None  # tensor that gets the output Q/DQ (after a folded Relu/Clip)
    add_bias: str | None = None  # MatMul's following Add constant, corrected in float
    dynamic: bool = False  # DynamicQuantizeLinear + MatMulInteger instead of static QDQ


@dataclass
class _Plan:
    dynamic: bool = False  # planned with dynamic MatMul/Gemm
    smooth_mul: bool = False  # dynamic: migration also where it needs an explicit Mul
    mul_sources: frozenset[str] | None = None  # smooth_mul only on these input tensors (None: wherever it pays)
    units: list[_Unit] = field(default_factory=list)
    acts: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it uses
    float_nodes: dict[str, str] = field(default_factory=dict)  # heavy nodes the plan keeps float on purpose: op
    narrow_float: frozenset[str] = frozenset()  # narrow Convs this form keeps float (auto's latency candidate)


@dataclass
class CalibrationRequest:
    """The model as quantize calibrates and rewrites it (opset upgraded, heavy nodes named, BatchNorm
    folded), and what it calibrates: ``tensors`` (activation ranges, ``histogram_bins`` > 0 for the
    histogram-based methods) and ``mean_axes`` (channel means for bias correction), the arguments of
    :func:`onnxopt.calibration.collect`. The rest is the pass's own state, built once."""

    model: onnx.ModelProto
    tensors: list[str]
    mean_axes: dict[str, int]
    channel_axes: dict[str, int]  # dynamic layers' inputs: per-channel sums, squares and extremes
    histogram_bins: int
    modified: bool  # the model differs from the one given (upgraded, nodes named, BatchNorm folded)
    stats: dict[str, int | float]
    plan: _Plan
    alternatives: dict[str, _Plan]  # auto mode: the dynamic alternatives to ``plan`` (empty: nothing to choose)
    index: GraphIndex  # of model.graph as planned
    store: WeightStore
    subgraphs: list[tuple[onnx.GraphProto, WeightStore, list[tuple[str, int | None]]]]
    make_name: Callable[[str], str]


class QuantizePass(Pass):
    name = "quantize"
    summary = ("int8 quantization from streamed calibration data: static QDQ or, for MatMul/Gemm, dynamic "
               "with outlier smoothing (measured choice); int8 embedding tables")
    Options = QuantizeOptions
    exact = False

    def requires(self, model: onnx.ModelProto) -> None:
        # calibration data is demanded in run, only when some activation needs a range
        # (weights inside subgraphs alone are quantized without it)
        if isinstance(self.context.calib, FeedSet):
            self.context.calib.check(model)

    def calibration_request(self, model: onnx.ModelProto) -> CalibrationRequest:
        """Prepare ``model`` for quantization (in place, or a new model when the opset is upgraded)
        and say what to calibrate on it."""
        opt = self.options
        stats: dict[str, int | float] = {"nodes_quantized": 0, "weights_quantized": 0, "activations_quantized": 0}
        before = opset_version(model)
        if before < QDQ_OPSET:
            model = _upgrade(model, before)
            stats["opset_upgraded_from"] = before
        make_name = unique_name_factory(model)
        named = _name_heavy_nodes(model.graph, make_name)
        opset = opset_version(model)
        if opt.fold_batchnorm:
            stats["batchnorm_folded"] = sum(fold_batchnorm(g, make_name, opset) for g in model_graphs(model))
        if opt.fuse_bias:  # Add(Conv, per-channel constant) becomes the Conv's own (int32) bias: no Q/DQ between
            stats["biases_fused"] = sum(fuse_bias(g, make_name, opset) for g in model_graphs(model))
        if opt.fold_norm_bias:  # counts norm_biases_folded and skipped_norm_* into stats
            for g in model_graphs(model):
                fold_norm_bias(g, make_name, opset, stats)
        index, store = GraphIndex(model.graph), WeightStore(model.graph)
        excluded = set(opt.exclude_nodes)
        plan = _plan(index, store, opt, excluded, stats, dynamic=opt.mode == "dynamic", smooth_mul=opt.smooth_mul)
        alternatives = {}
        if opt.mode == "auto":
            narrow = {u.node.name for u in plan.units if _narrow_conv(u, store)}
            if narrow and len(narrow) < len(plan.units):
                alternatives["static+float_narrow_convs"] = _plan(index, store, opt, excluded, {},
                                                                  narrow_float=frozenset(narrow))
            dynamic = _plan(index, store, opt, excluded, {}, dynamic=True)
            if any(u.dynamic for u in dynamic.units):  # else no MatMul/Gemm to run dynamically
                alternatives["dynamic"] = dynamic
                if opt.smooth and opt.smooth_mul:
                    alternatives["dynamic+mul"] = _plan(index, store, opt, excluded, {}, dynamic=True, smooth_mul=True)
        plans = [plan, *alternatives.values()]
        static_units = [u for p in plans for u in p.units if not u.dynamic]
        axes = ({u.activations[0]: u.use.data_axis for u in static_units if u.use is not None}
                if opt.bias_correction else {})
        channel_axes = ({u.activations[0]: -1 for p in plans for u in p.units if u.dynamic}
                        if opt.smooth or opt.bias_correction else {})
        tensors = {t for p in plans for t in p.acts.values()}
        if opt.min_cosine > 0 or opt.layer_sensitivity:  # trials keep layers float: tensors that shared
            tensors |= {t for p in plans for t in p.acts}  # such a layer's range then need their own
        tensors = sorted(tensors)
        return CalibrationRequest(
            model=model, tensors=tensors, mean_axes=axes, channel_axes=channel_axes,
            histogram_bins=0 if opt.method == "minmax" or not tensors else 2048,
            modified=before < QDQ_OPSET or named > 0 or bool(stats.get("batchnorm_folded") or stats.get("biases_fused")
                                                             or stats.get("norm_biases_folded")),
            stats=stats, plan=plan, alternatives=alternatives, index=index, store=store,
            subgraphs=_subgraph_units(model, opt), make_name=make_name)

    def run(self, model: onnx.ModelProto) -> PassResult:
        kept = model_names(model) if self.options.short_names else None
        result = self._run(model)
        if kept is not None and result.modified:
            result.stats["names_shortened"] = shorten_names(result.model, kept)
        return result

    def _run(self, model: onnx.ModelProto) -> PassResult:
        opt = self.options
        request = self.calibration_request(model)
        model, plan, stats = request.model, request.plan, request.stats
        details: dict = {}
        if not plan.units:  # weight-only work in subgraphs and embedding tables need no calibration data
            weight_only = any(units for _, _, units in request.subgraphs)
            if weight_only:
                _apply(model, request.store, plan, request.subgraphs, _Quantized({}, opt), request.make_name, stats,
                       request.index)
            layers = self._embeddings(model, request, stats)
            if layers:
                details["layers"] = layers
            return PassResult(model, request.modified or weight_only or bool(layers), stats, details)
        feeds = _checked(self.context.calibration_feeds(self.name), model)
        quantized = _Quantized(self._calibrate(request, feeds), opt)
        sensitivity: dict[str, float] = {}
        if request.alternatives:
            plan = _choose_mode(request, quantized, feeds, stats, details)
        if opt.min_cosine > 0:
            kept = _keep_sensitive(request, plan, quantized, feeds, stats, sensitivity, self.context.executor)
            plan = _replan(request, opt, plan, set(opt.exclude_nodes) | kept)
            stats["kept_float"] = len(kept)
            stats.update({f"kept_float:{name}": 1 for name in sorted(kept)})
        elif opt.layer_sensitivity:
            trials = _Trials(request, quantized, feeds, self.context.executor)
            try:
                sensitivity = _layer_sensitivity(plan, _trial_cosines(request, plan, trials))
            finally:
                trials.close()
        if opt.rounding == "learned":  # after the choices above, which measure nearest rounding (see the notes)
            holdout = self._learn_rounding(request, plan, quantized, feeds, stats)
            if holdout is not None:
                details["rounding_holdout"] = holdout
        layers = _apply(model, request.store, plan, request.subgraphs, quantized, request.make_name, stats,
                        request.index)
        stats.update(quantized.rounding_stats)
        if quantized.curves:
            details["loss_curves"] = quantized.curves
        for row in layers:
            if row["name"] in sensitivity:
                row["cosine_alone"] = sensitivity[row["name"]]
        if sensitivity:  # most sensitive first: the ranking the report plots
            kept_float = {k.split(":", 1)[1] for k in stats if k.startswith("kept_float:")}
            details["sensitivity"] = [{"name": n, "cosine_alone": c, "kept_float": n in kept_float}
                                      for n, c in sorted(sensitivity.items(), key=lambda item: item[1])]
        details["layers"] = layers + self._embeddings(model, request, stats)
        if opt.float16_constants:
            _half_constants(model.graph, request.make_name, stats)
        summed = residual_adds_as_sum(model) if opt.residual_sum else 0
        if summed:
            stats["residual_sums"] = summed
        return PassResult(model, True, stats, details)

    def _learn_rounding(self, request: CalibrationRequest, plan: _Plan, quantized: _Quantized, feeds,
                        stats: dict) -> dict | None:
        """Learn the plan's weight rounding from the statistics of the fitting samples, and keep it only if the
        whole model is not worse than with nearest rounding on the held-out samples, against the float model:
        a layer's output error on calibration data is not the task (a lower one lost 2 of 1024 eval samples on
        samples/mlp). The comparison for the report, or None without held-out samples."""
        fit, held = _holdout(feeds, self.options.rounding_holdout)
        layers = {u.use.data: _geometry(u, request.store) for u in plan.units if u.use is not None}
        trials = None if held is None else _Trials(request, quantized, held, samples=HOLDOUT_MAX_SAMPLES)
        nearest_model = None if trials is None else trials.model(plan)  # built before learn: nearest rounding
        quantized.learn(input_statistics(request.model, fit, layers, executor=self.context.executor))
        if trials is None:
            count(stats, "rounding_holdout_skipped")
            return None
        outputs = {"nearest": run_model(nearest_model, trials.subset), "learned": run_model(trials.model(plan),
                                                                                           trials.subset)}
        scores = {name: _holdout_score(trials.reference, out) for name, out in outputs.items()}
        # argmax flips: an output's top-1 agreement is a task score for class scores and noise for hidden states
        # (minilm_l3's tokens: 8 of 2048 flipped either way); a loss counts where it is beyond chance (McNemar)
        lost, won = _top1_flips(trials.reference, outputs["nearest"], outputs["learned"])
        kept = ("learned" if scores["learned"]["rel_l2"] <= scores["nearest"]["rel_l2"]
                and lost - won <= 2 * np.sqrt(lost + won) else "nearest")
        if kept == "nearest":
            quantized.learn({})  # every weight rounds to nearest again (both forms are cached)
        stats["rounding_holdout_samples"] = len(trials.subset)
        stats["rounding_holdout_kept_learned"] = int(kept == "learned")
        return {"samples": len(trials.subset), **scores, "top1_lost": lost, "top1_won": won, "kept": kept}

    def _embeddings(self, model: onnx.ModelProto, request: CalibrationRequest, stats: dict) -> list[dict]:
        """Embedding tables of the main graph to integers (rows for the report)."""
        fmt = EMBEDDING_FORMATS[self.options.embeddings]
        if fmt is None:
            return []
        graph = model.graph
        return quantize_embeddings(model, graph, GraphIndex(graph), WeightStore(graph), request.make_name, stats,
                                   bits=fmt[0], block_size=fmt[1], exclude=frozenset(self.options.exclude_nodes))

    def _calibrate(self, request: CalibrationRequest, feeds) -> dict[str, TensorStats]:
        """Stream the calibration data once, or reuse a cache made for this model."""
        wanted, axes, bins, stats = request.tensors, request.mean_axes, request.histogram_bins, request.stats
        channel_axes = request.channel_axes
        fingerprint = model_fingerprint(request.model)
        cache = self.context.calib_cache
        if cache is not None and cache.exists():
            cached, saved_for = load_stats(cache)
            usable = saved_for == fingerprint and all(
                n in cached and (not bins or cached[n].codes is not None) for n in wanted
            ) and all(cached[n].channel_sum is not None for n in axes if n in cached) and all(
                cached[n].channel_sumsq is not None and cached[n].channel_min is not None
                for n in channel_axes if n in cached)
            if usable and all(n in cached for n in [*axes, *channel_axes]):
                stats["calib_cache_hit"] = 1
                return cached
        result = collect(request.model, feeds, wanted, histogram_bins=bins, mean_axes=axes, sumsq_axes=channel_axes,
                         batch_size=self.options.batch_size, progress=self.context.progress,
                         executor=self.context.executor)
        if cache is not None:
            save_stats(cache, result, fingerprint)
        stats["calib_cache_hit"] = 0
        return result


# --------------------------------------------------------------------------- held-out samples


def _holdout(feeds, fraction: float):
    """(fitting samples, held-out samples or None). A FeedSet's held-out samples are the tails of
    HOLDOUT_BLOCKS equal runs (calibration files are often ordered: by class, by source), at most
    HOLDOUT_MAX_SAMPLES, windows over the same arrays (nothing copied or read); other iterables hold out
    every ``round(1 / fraction)``-th sample. None when ``fraction`` is 0 or leaves no sample on either side."""
    if not fraction:
        return feeds, None
    if not isinstance(feeds, FeedSet):
        period = max(2, round(1 / fraction))
        return _EveryNth(feeds, period, held=False), _EveryNth(feeds, period, held=True)
    n = len(feeds)
    held = min(round(n * fraction), HOLDOUT_MAX_SAMPLES, n - 1)
    if held < 1:
        return feeds, None
    blocks = min(HOLDOUT_BLOCKS, held)
    ends = [(b + 1) * n // blocks for b in range(blocks)]
    lengths = [end - (0 if b == 0 else ends[b - 1]) for b, end in enumerate(ends)]
    sizes = [min(held // blocks + (b < held % blocks), length) for b, length in enumerate(lengths)]
    for b, length in enumerate(lengths):  # what a short run cannot hold goes to the runs with room
        sizes[b] += min(held - sum(sizes), length - sizes[b])
    held_runs = [(end - size, end) for end, size in zip(ends, sizes)]
    fit_runs = [(0 if b == 0 else ends[b - 1], start) for b, (start, _) in enumerate(held_runs)]
    return _runs(feeds, fit_runs), _runs(feeds, held_runs)


def _runs(feeds: FeedSet, runs: list[tuple[int, int]]) -> FeedSet:
    """The samples of ``runs`` ([start, stop) each) as one FeedSet of windows."""
    parts = [feeds.window(start, stop) for start, stop in runs if stop > start]
    return FeedSet({name: ChainedRows([p.arrays[name] for p in parts], feeds.origin) for name in feeds.arrays},
                   f"{feeds.origin} samples {', '.join(f'{a}..{b - 1}' for a, b in runs if b > a)}")


class _EveryNth:
    """Every ``period``-th sample of a re-iterable (``held``), or all the others."""

    def __init__(self, feeds, period: int, held: bool) -> None:
        self.feeds, self.period, self.held = feeds, period, held

    def __iter__(self):
        for i, feed in enumerate(self.feeds):
            if (i % self.period == self.period - 1) == self.held:
                yield feed


def _top1_flips(reference: dict[str, list], before: dict[str, list], after: dict[str, list]) -> tuple[int, int]:
    """(positions whose argmax ``after`` no longer agrees with the reference's where ``before`` did, and the
    reverse), over the outputs that look like class scores (:func:`onnxopt.validate.top1_counts`)."""
    lost = won = 0
    for name, ref in reference.items():
        if top1_counts(ref, before[name]) is None:
            continue
        for r, b, a in zip(ref, before[name], after[name]):
            target = np.asarray(r).argmax(axis=-1)
            hit_before, hit_after = np.asarray(b).argmax(axis=-1) == target, np.asarray(a).argmax(axis=-1) == target
            lost += int(np.count_nonzero(hit_before & ~hit_after))
            won += int(np.count_nonzero(hit_after & ~hit_before))
    return lost, won


def _holdout_score(reference: dict[str, list], candidate: dict[str, list]) -> dict:
    """A candidate's outputs against the float model's on held-out samples: mean top-1 agreement (None where
    no output is class scores), mean relative L2 error and worst cosine over the outputs."""
    metrics = [output_metrics(reference[name], candidate[name], Tolerances()) for name in reference]
    agreement = [m.top1_agreement for m in metrics if m.top1_agreement is not None]
    return {"top1_agreement": float(np.mean(agreement)) if agreement else None,
            "rel_l2": float(np.mean([m.rel_l2 for m in metrics])), "worst_cosine": min(m.cosine for m in metrics)}


# --------------------------------------------------------------------------- model preparation


def _upgrade(model: onnx.ModelProto, before: int) -> onnx.ModelProto:
    """Per-channel QDQ needs opset 13; the converter returns a new model (the one needed copy)."""
    try:
        upgraded = onnx.version_converter.convert_version(model, QDQ_OPSET)
        upgraded.ir_version = max(upgraded.ir_version, 7)  # opset 13 needs IR 7 (and IR < 4 wants initializers as inputs)
        del upgraded.graph.value_info[:]  # the converter infers shapes of every value: file size, not needed
        upgraded.graph.value_info.extend(model.graph.value_info)
    except Exception as exc:  # the converter raises several types
        raise InputError(f"quantize needs opset >= {QDQ_OPSET} for per-channel QDQ; the model has opset "
                         f"{before} and upgrading it failed: {str(exc).splitlines()[0]}") from None
    return upgraded


def _name_heavy_nodes(graph: onnx.GraphProto, make_name) -> int:
    """Exclusion, sensitivity and the kept_float report go by node name: give unnamed heavy nodes one (how many)."""
    named = 0
    for node in graph.node:
        if node.op_type in HEAVY and not node.name:
            node.name = make_name(f"{node.op_type}_{node.output[0]}")
            named += 1
    return named


def _checked(feeds, model: onnx.ModelProto):
    """A FeedSet is checked whole (in requires); other iterables one sample at a time as they stream."""
    if isinstance(feeds, FeedSet):
        return feeds

    class Checked:
        def __iter__(self):
            seen = False
            for feed in feeds:
                FeedSet({k: np.asarray(v)[None] for k, v in feed.items()}, "calibration sample").check(model)
                seen = True
                yield feed
            if not seen:
                raise InputError("calibration data: no samples")

    return Checked()


# --------------------------------------------------------------------------- planning


def _unit(node: onnx.NodeProto, index: GraphIndex, store: WeightStore, opt: QuantizeOptions,
          stats: dict) -> _Unit | None:
    """How to quantize one heavy node, or None (the reason is counted)."""
    inputs = list(node.input)
    if node.op_type == "Conv":
        if inputs[1] not in store:
            count(stats, "skipped_dynamic_weight")
            return None
        weight, acts = inputs[1], [inputs[0]]
    elif node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            count(stats, "skipped_gemm_attributes")
            return None
        weight = inputs[1] if inputs[1] in store else None
        acts = [inputs[0]] + ([] if weight else [inputs[1]])
    else:
        constant = [n for n in inputs if n in store]
        if len(constant) == 2:
            count(stats, "skipped_constant_operands")
            return None
        weight = constant[0] if constant else None
        acts = [n for n in inputs if n != weight]
    if weight is not None and store.tensor(weight).data_type != onnx.TensorProto.FLOAT:
        count(stats, "skipped_not_float32")
        return None
    # per-channel axis and bias correction need the weight as second operand (x @ W, x * W)
    use = weight_use(node, store) if weight is not None else None
    axis = use.out_axis if use is not None else None
    bias = None
    if node.op_type in ("Conv", "Gemm") and len(inputs) > 2 and inputs[2]:
        b = store.tensor(inputs[2])
        shared = len(index.consumers.get(inputs[2], ())) != 1
        if b is None or shared or len(b.dims) != 1 or weight is None:
            count(stats, "skipped_int32_bias")
        else:
            bias = inputs[2]
    out = node.output[0]
    consumers = index.consumer_nodes(out)
    add_bias = None
    if node.op_type == "MatMul" and weight and len(consumers) == 1 and consumers[0].op_type == "Add":
        other = [n for n in consumers[0].input if n != out]
        t = store.tensor(other[0]) if len(other) == 1 else None
        if t is not None and len(t.dims) == 1 and len(index.consumers.get(other[0], ())) == 1:
            add_bias = other[0]
    feeds_int8 = any(c.op_type in opt.op_types or c.op_type in PASS_THROUGH | AVERAGING for c in consumers)
    if index.is_graph_output(out) or not consumers:
        output = None
    elif (opt.activation_type == "uint8" and len(consumers) == 1 and _relu_like(consumers[0], store)
          and not index.is_graph_output(consumers[0].output[0])):
        output = consumers[0].output[0]
    elif node.op_type != "Conv" and not feeds_int8:
        output = None  # float consumers only: QGemm / MatMulIntegerToFloat take float output, no extra Q/DQ
    else:
        output = out
    return _Unit(node, weight, axis if opt.per_channel else None, acts, bias, use, output, add_bias)


def _runs_dynamic(unit: _Unit, index: GraphIndex, store: WeightStore) -> bool:
    """A 2-D weight as second operand that no other node reads (it is stored transposed or smoothed),
    the data as first operand."""
    node = unit.node
    return (unit.use is not None and len(store.tensor(unit.weight).dims) == 2 and unit.activations == [node.input[0]]
            and len(index.consumers.get(unit.weight, ())) == 1 and not index.is_graph_output(unit.weight))


def _relu_like(node: onnx.NodeProto, store: WeightStore) -> bool:
    """Relu, or Clip with a lower bound of 0: a uint8 zero point of 0 makes it a no-op after Q."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1 and node.input[1]:
        low = store.array(node.input[1])
        return low is not None and float(low) == 0.0
    return attribute(node, "min") == 0.0


def _narrow_conv(unit: _Unit, store: WeightStore) -> bool:
    """A spatial Conv whose every output sums few products (NARROW_CONV_REDUCTION): int8 does not pay there
    (1x1 Convs are plain GEMMs that do gain; a weight-only int8 form would not help either, since
    onnxruntime keeps a weight's DequantizeLinear unfolded and the float Conv then loses its NCHWc kernel)."""
    if unit.node.op_type != "Conv" or unit.weight is None:
        return False
    dims = store.tensor(unit.weight).dims
    return int(np.prod(dims[2:])) > 1 and int(np.prod(dims[1:])) <= NARROW_CONV_REDUCTION


def _plan(index: GraphIndex, store: WeightStore, opt: QuantizeOptions, float_nodes: set[str], stats: dict,
          dynamic: bool = False, smooth_mul: bool = False, narrow_float: frozenset[str] = frozenset()) -> _Plan:
    """Which nodes to quantize and which tensors get Q/DQ pairs (linear in graph size; reads the graph only).

    ``dynamic``: MatMul/Gemm with a constant weight become dynamic units (no Q/DQ pairs: the range is
    taken per run) and activation-activation MatMuls stay float; Conv stays static.
    """
    plan = _Plan(dynamic=dynamic, smooth_mul=dynamic and smooth_mul, narrow_float=narrow_float)
    for i in index.topological_order():
        node = index.nodes[i]
        if node.domain not in ("", "ai.onnx") or node.op_type in opt.exclude_op_types:
            continue
        if node.name in narrow_float:
            plan.float_nodes[node.name] = node.op_type
        if node.name in float_nodes or node.name in narrow_float:
            continue
        if node.op_type in opt.op_types:
            unit = _unit(node, index, store, opt, stats)
            if unit is None:
                continue
            if dynamic and node.op_type != "Conv":
                if unit.weight is None:
                    plan.float_nodes[node.name] = node.op_type
                    count(stats, "float_activation_matmul")
                    continue
                if _runs_dynamic(unit, index, store):
                    unit.dynamic = True
                    plan.units.append(unit)
                    continue
            plan.units.append(unit)
            for name in [*unit.activations, *([unit.output] if unit.output else [])]:
                plan.acts.setdefault(name, name)
        elif node.op_type in PASS_THROUGH and node.input[0] in plan.acts and node.output[0] not in plan.acts:
            plan.acts[node.output[0]] = plan.acts[node.input[0]]
        elif (node.op_type in AVERAGING and node.input[0] in plan.acts and node.output[0] not in plan.acts
              and not index.is_graph_output(node.output[0])):
            plan.acts[node.output[0]] = node.output[0]
    return plan


def _subgraph_units(model: onnx.ModelProto, opt: QuantizeOptions
                    ) -> list[tuple[onnx.GraphProto, WeightStore, list[tuple[str, int | None]]]]:
    """Per subgraph (If/Loop bodies, nested too, in walk order): its heavy nodes' own float weights and axes.

    Only weights are quantized there: body activations cannot be observed from outside.
    """
    found = []
    for g in itertools.islice(walk_graphs(model.graph), 1, None):
        store = WeightStore(g)
        units = []
        for node in g.node:
            if (node.op_type not in opt.op_types or node.name in opt.exclude_nodes
                    or node.op_type in opt.exclude_op_types or len(node.input) < 2):
                continue
            t = store.tensor(node.input[1]) if node.input[1] in store else None
            if t is None or t.data_type != onnx.TensorProto.FLOAT:
                continue
            use = weight_use(node, store)
            units.append((node.input[1], use.out_axis if use is not None and opt.per_channel else None))
        found.append((g, store, units))
    return found


# --------------------------------------------------------------------------- ranges


def _choose_range(st: TensorStats, opt: QuantizeOptions) -> tuple[float, float]:
    """Clipping range of one activation tensor by the chosen method (always includes 0)."""
    lo, hi = min(st.min, 0.0), max(st.max, 0.0)
    if opt.method == "minmax" or hi - lo <= 0 or st.codes is None:
        return lo, hi
    symmetric = opt.activation_type == "int8"
    values, counts = st.distribution()
    if symmetric:
        mags = np.abs(values)
        order = np.argsort(mags, kind="stable")
        values, counts = mags[order], counts[order]
    if opt.method == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        q = opt.percentile / 100.0
        top = float(values[min(np.searchsorted(cdf, q), len(values) - 1)])
        if symmetric:
            return -top, top
        bottom = float(values[min(np.searchsorted(cdf, 1.0 - q), len(values) - 1)])
        return min(bottom, 0.0), max(top, 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    if opt.method == "mse":
        return _mse_range(values, counts, lo, hi, 254 if symmetric else 255)
    return _entropy_range(values, counts, lo, hi, symmetric)


def _mse_range(values, counts, lo, hi, levels) -> tuple[float, float]:
    """Shrink [lo, hi] by the factor minimising expected error: clipping error outside, step^2/12 inside."""
    alphas = np.geomspace(1e-3, 1.0, 256)[:, None]
    lows, highs = alphas * lo, alphas * hi
    step = (highs - lows) / levels
    outside = np.maximum(values[None] - highs, 0) + np.maximum(lows - values[None], 0)
    inside = outside == 0
    err = (counts * np.where(inside, step**2 / 12, outside**2)).sum(axis=1)
    best = int(np.argmin(err))
    return float(lows[best, 0]), float(highs[best, 0])


def _entropy_range(values, counts, lo, hi, symmetric) -> tuple[float, float]:
    """TensorRT-style KL threshold on |x| over 2048 bins, candidates every 16 bins.

    Levels: 128 per side for signed data, 256 for non-negative data under uint8 (it gets them all).
    """
    levels = 256 if lo == 0 and not symmetric else 128
    mags = np.abs(values)
    top = float(mags.max())
    if top == 0:
        return lo, hi
    hist = np.histogram(mags, 2048, range=(0, top), weights=counts)[0]
    best, best_kl = 2048, np.inf
    for i in range(levels, 2049, 16):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        chunk = np.arange(i) * levels // i
        nonzero = hist[:i] > 0
        sums = np.bincount(chunk, weights=hist[:i], minlength=levels)
        nz = np.bincount(chunk, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[chunk] / np.maximum(nz[chunk], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = ps > 0
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = i, kl
    t = best / 2048 * top
    return (-t, t) if symmetric else (max(lo, -t), min(hi, t))


def _activation_params(st: TensorStats, opt: QuantizeOptions) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _choose_range(st, opt)
    if opt.activation_type == "int8":
        scale = np.float32(max(-lo, hi) / 127.0 or 1.0)
        return np.array(scale, np.float32), np.array(0, np.int8)
    scale = np.float32((hi - lo) / 255.0 or 1.0)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return np.array(scale, np.float32), np.array(zp, np.uint8)


def _quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (zero point 0), per channel along ``axis`` or per tensor."""
    qmax = 63 if reduce_range else 127
    if axis is None:
        absmax = np.abs(w).max(initial=0.0)
    else:
        absmax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1, initial=0.0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    shaped = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
    q = np.clip(np.round(w / shaped), -qmax, qmax).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- rewrite


class _Quantized:
    """Quantized weights, bias-corrected float biases and activation parameters, each computed once
    from the calibration statistics (accuracy-aware trials reuse them instead of quantizing again).

    Learned rounding (``learn``) applies to every weight quantized after it is given the layers' input
    statistics: static units' int8 weights and dynamic units' (smoothed) [K, N] weights alike.
    """

    def __init__(self, tensor_stats: dict[str, TensorStats], opt: QuantizeOptions) -> None:
        self.tensor_stats, self.opt = tensor_stats, opt
        self._activations: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._weights: dict[tuple, tuple] = {}
        self.hessians: dict[str, LayerStatistics] = {}  # learned rounding: XᵀX of each unit's data input
        self.curves: dict[str, dict] = {}
        self.rounding_stats: dict[str, int] = {}

    def learn(self, hessians: dict[str, LayerStatistics]) -> None:
        """Round the weights quantized from now on by learned rounding against these input statistics."""
        self.hessians = hessians

    def _learns(self, unit: _Unit) -> bool:
        return unit.use is not None and unit.use.data in self.hessians

    def activation(self, src: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) of one activation range."""
        if src not in self._activations:
            self._activations[src] = _activation_params(self.tensor_stats[src], self.opt)
        return self._activations[src]

    def weight(self, weight: str, axis: int | None, store: WeightStore, key: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
        """(int8 weight, scale) of a weight read from ``store``."""
        key = (weight, axis, *key)
        if key not in self._weights:
            self._weights[key] = _quantize_weight(store.array(weight), axis, self.opt.reduce_range)
        return self._weights[key]

    def unit(self, unit: _Unit, store: WeightStore) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
        """(int8 weight, scale, float bias or None, whether bias correction changed the bias) of a unit."""
        bias_name = unit.bias or unit.add_bias
        learned = self._learns(unit)
        key = ("unit", unit.weight, unit.axis, bias_name, unit.activations[0] if unit.activations else None, learned)
        if key not in self._weights:
            w = store.array(unit.weight)
            q, scale = self.weight(unit.weight, unit.axis, store)
            if learned:
                q = self._learned_static(unit, store, scale)
            bias = store.array(bias_name) if bias_name else None
            mean = (self.tensor_stats[unit.activations[0]].channel_mean
                    if self.opt.bias_correction and unit.use is not None else None)
            corrected = False
            if mean is not None and bias is not None:
                shaped = scale if unit.axis is None else scale.reshape([-1 if d == unit.axis else 1 for d in range(w.ndim)])
                dw = q.astype(np.float64) * shaped - w  # E[(Wq - W) x] per output channel
                bias = (bias - mean_contribution(to_canonical(dw, unit.use), mean, unit.use.groups)).astype(np.float32)
                corrected = True
            self._weights[key] = (q, scale, bias, corrected)
        return self._weights[key]

    def smoothing(self, source: str, units: list[_Unit], store: WeightStore) -> tuple[np.ndarray | None, float, float]:
        """(per-channel migration scale or None, alpha, estimated error ratio) of the dynamic units reading
        ``source``."""
        key = ("smooth", source, tuple(u.weight for u in units))
        if key not in self._weights:
            st = self.tensor_stats.get(source)
            if not self.opt.smooth or st is None:
                self._weights[key] = (None, 0.0, 1.0)
            else:
                weights = [_as_k_by_n(store.array(u.weight), u) for u in units]
                self._weights[key] = smoothing_scale(st, weights, 63 if self.opt.reduce_range else 127,
                                                     self.opt.smooth_alpha)
        return self._weights[key]

    def dynamic_unit(self, unit: _Unit, store: WeightStore, s: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray | None, float]:
        """(int8 [K, N] weight, scale per column, bias-corrected float bias or None, weight relative error) of a
        dynamic unit whose input is divided by ``s`` (None: not smoothed)."""
        learned = self._learns(unit)
        key = ("dynamic", unit.weight, None if s is None else s.tobytes(), learned)
        if key not in self._weights:
            w = _as_k_by_n(store.array(unit.weight), unit)
            if s is not None:
                w = w * s[:, None].astype(np.float32)
            q, scale = _quantize_weight(w, 1 if self.opt.per_channel else None, self.opt.reduce_range)
            bias_name = unit.bias or unit.add_bias
            bias = store.array(bias_name) if bias_name else None
            st = self.tensor_stats.get(unit.activations[0])
            corrects = bias is not None and self.opt.bias_correction and st is not None and st.channel_mean is not None
            if learned:  # the input is x / s: its second moments are H / (s sᵀ)
                sums = self.hessians[unit.use.data]
                h = (sums.centered() if corrects else sums.hessian)[0]
                if s is not None:
                    h = h / np.outer(s, s)
                scales = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[1],))
                q = self._learned(unit, w[None], h[None], scales)[0].astype(np.int8)
            dw = q.astype(np.float64) * scale - w
            if corrects:
                mean = st.channel_mean if s is None else st.channel_mean / s
                bias = (bias - mean @ dw).astype(np.float32)  # E[(Wq - W) x] per output column
            error = float(np.linalg.norm(dw) / max(np.linalg.norm(w), 1e-30))
            self._weights[key] = (q, scale, bias, error)
        return self._weights[key]

    def _learned_static(self, unit: _Unit, store: WeightStore, scale: np.ndarray) -> np.ndarray:
        """int8 codes of a static unit by learned rounding against its input statistics (per Conv group)."""
        g, w = _geometry(unit, store), store.array(unit.weight)
        canonical = to_canonical(w, unit.use)
        per_group = np.swapaxes(canonical.reshape(g.groups, g.outputs, g.inputs), 1, 2)  # (G, K, N) MatMul layout
        scales = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (g.groups * g.outputs,))
        sums = self.hessians[unit.use.data]
        corrected = self.opt.bias_correction and (unit.bias or unit.add_bias)  # the mean error goes to the bias
        codes = self._learned(unit, per_group, sums.centered() if corrected else sums.hessian, scales)
        q = np.swapaxes(codes, 1, 2).reshape(canonical.shape)
        return from_canonical(q, unit.use).astype(np.int8)

    def _learned(self, unit: _Unit, per_group: np.ndarray, hessians: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Codes (G, K, N) of weights (G, K, N) with per-column ``scales`` (G·N), each group against its
        (K, K) statistics; counts the outcome and keeps the mean loss curve for the report."""
        qmax = 63 if self.opt.reduce_range else 127
        schedule = Schedule(self.opt.lr_schedule, steps=self.opt.rounding_steps)
        outputs = per_group.shape[2]
        codes, curves, learned = [], [], True
        for i in range(per_group.shape[0]):
            c, curve, better = learned_rounding(per_group[i], hessians[i], scales[i * outputs: (i + 1) * outputs],
                                                qmin=-qmax, qmax=qmax, schedule=schedule)
            codes.append(c)
            curves.append(curve)
            learned &= better
        key = "rounding_learned" if learned else "rounding_kept_nearest"
        self.rounding_stats[key] = self.rounding_stats.get(key, 0) + 1
        self.curves[unit.node.name] = {"schedule": schedule.kind, "optimizer": "adam", "steps": schedule.steps,
                                       "loss": np.mean(curves, axis=0).tolist()}
        return np.stack(codes)


def _as_k_by_n(w: np.ndarray, unit: _Unit) -> np.ndarray:
    """A MatMul/Gemm weight as [K, N] (Gemm transB=1 stores it [N, K]), the layout MatMulInteger reads."""
    return w.T if unit.use.out_axis == 0 else w


def _geometry(unit: _Unit, store: WeightStore) -> LayerGeometry:
    dims = tuple(store.tensor(unit.weight).dims)
    use = unit.use
    return (LayerGeometry.conv(use.node, dims) if use.node.op_type == "Conv"
            else LayerGeometry.linear(dims[use.in_axis], dims[use.out_axis], use.data_axis))


class _Writer:
    """Adds scale/zero-point initializers and Q/DQ nodes to one graph; the node list is rebuilt once."""

    def __init__(self, store: WeightStore, make_name, index: GraphIndex | None = None) -> None:
        self.graph, self.store, self.name = store.graph, store, make_name
        self._index = index  # finds the Constant node of a weight (built when first needed)
        self.front: list[onnx.NodeProto] = []  # DQ of initializer weights and of graph inputs
        self.after: dict[str, list[onnx.NodeProto]] = {}  # produced value -> nodes to put after its producer
        self.replaced: dict[str, list[onnx.NodeProto]] = {}  # first output of a node -> the nodes replacing it

    def initializer(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.store.add_initializer(name, array)
        return name

    def store_int(self, weight: str, q: np.ndarray) -> tuple[str, list[onnx.NodeProto]]:
        """Store ``q`` where the float weight was (initializer or Constant), under a new name; the new name
        and the node list where a node reading it right away goes."""
        stored = self.name("qw")
        tensor = numpy_helper.from_array(q, stored)
        if self.store.is_constant_node(weight):
            if self._index is None:
                self._index = GraphIndex(self.graph)
            node = self._index.producer_node(weight)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", tensor))
            node.output[0] = stored
            return stored, self.after.setdefault(stored, [])
        self.store.tensor(weight).CopyFrom(tensor)
        return stored, self.front

    def weight_to_int(self, weight: str, q: np.ndarray, scale: np.ndarray, axis: int | None,
                      zero_point: bool = True) -> None:
        """Store ``q`` where the float weight was, under a new name; a DQ gives back the old name.

        ``zero_point=False`` leaves the (all-zero) zero point out, where onnxruntime fuses without it
        (Conv weights, int32 biases): per channel it would cost a quarter of the int8 weight of a
        depthwise Conv, and as much as an int32 bias.
        """
        stored, where = self.store_int(weight, q)
        inputs = [stored, self.initializer("s", scale)]
        if zero_point:
            inputs.append(self.initializer("z", np.zeros(scale.shape, q.dtype)))
        attrs = {} if axis is None or scale.ndim == 0 else {"axis": axis}
        where.append(onnx.helper.make_node("DequantizeLinear", inputs, [weight], **attrs))


def _apply(model: onnx.ModelProto, store: WeightStore, plan: _Plan, subgraphs, quantized: _Quantized, make_name,
           stats: dict, index: GraphIndex) -> list[dict]:
    """Rewrite the model in place by the plan; one row per heavy node for the report.

    ``store`` and the ``subgraphs``' stores are of this model's graphs; ``index`` is of the main graph
    as planned: this one, or the prepared model an accuracy-aware trial copied (names only, then).
    """
    graph = model.graph
    writer = _Writer(store, make_name, index if index.graph is graph else None)
    produced = index.producer
    param_names: dict[str, tuple[str, str]] = {}
    rename: dict[str, str] = {}
    layers = []
    for tensor, src in plan.acts.items():
        if src not in param_names:
            scale, zp = quantized.activation(src)
            param_names[src] = (writer.initializer("s", scale), writer.initializer("z", zp))
            layers.append(_activation_row(src, quantized.tensor_stats[src], scale, zp))
        s, z = param_names[src]
        q, dq = make_name("q"), make_name("dq")
        pair = [onnx.helper.make_node("QuantizeLinear", [tensor, s, z], [q]),
                onnx.helper.make_node("DequantizeLinear", [q, s, z], [dq])]
        (writer.after.setdefault(tensor, []) if tensor in produced else writer.front).extend(pair)
        rename[tensor] = dq
    stats["activations_quantized"] = len(plan.acts)
    done: set[str] = set()
    for unit in plan.units:
        if not unit.dynamic:
            x_scale = quantized.activation(plan.acts[unit.activations[0]])[0] if unit.activations else None
            layers.append(_quantize_unit(unit, writer, x_scale, quantized, done, stats))
    dynamic = [u for u in plan.units if u.dynamic]
    if dynamic:
        layers += _quantize_dynamic(dynamic, writer, quantized, index if index.graph is graph else GraphIndex(graph),
                                    make_name, stats, plan.smooth_mul, plan.mul_sources)
    layers += [{"name": name, "op": op, "mode": "float"} for name, op in plan.float_nodes.items()]
    stats["nodes_quantized"] = len(plan.units)
    for position, (sub, sub_store, units) in enumerate(subgraphs):
        sub_writer, sub_done = _Writer(sub_store, make_name), set()
        for weight, axis in units:
            count(stats, "weight_only_nodes")
            if weight not in sub_done:
                sub_done.add(weight)
                q, scale = quantized.weight(weight, axis, sub_store, ("subgraph", position))
                sub_writer.weight_to_int(weight, q, scale, axis)
                count(stats, "weights_quantized")
        if units:
            _rebuild(sub, sub_writer, {})
    _rebuild(graph, writer, rename)
    return layers


def _activation_row(name: str, st: TensorStats, scale: np.ndarray, zero_point: np.ndarray) -> dict:
    """Report row of one activation range: the range and, from the histogram, the signal-to-quantization-noise
    ratio of the observed distribution (clipping included): which tensors the static form hurts."""
    low, high = (0, 255) if zero_point.dtype == np.uint8 else (-128, 127)
    zp, step = float(zero_point), float(scale)
    row = {"name": name, "kind": "activation", "min": st.min, "max": st.max,
           "range": [(low - zp) * step, (high - zp) * step]}
    if st.codes is not None:
        values, counts = st.distribution()
        restored = (np.clip(np.round(values / step) + zp, low, high) - zp) * step
        noise = float(np.sum(counts * (restored - values) ** 2))
        signal = float(np.sum(counts * values**2))
        row["sqnr_db"] = float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else None
    return row


def _quantize_unit(unit: _Unit, writer: _Writer, x_scale, quantized: _Quantized, done: set[str], stats) -> dict:
    """Weight to int8 (with bias correction), bias to int32 when the input scale is known; the report row."""
    row = {"name": unit.node.name, "op": unit.node.op_type, "mode": "static"}
    if unit.weight is None or unit.weight in done:
        return row
    done.add(unit.weight)
    q, scale, bias, corrected = quantized.unit(unit, writer.store)
    w = writer.store.array(unit.weight)
    shaped = scale if unit.axis is None else scale.reshape([-1 if d == unit.axis else 1 for d in range(w.ndim)])
    row["weight_rel_err"] = float(np.linalg.norm(q * shaped - w) / max(np.linalg.norm(w), 1e-30))
    # onnxruntime's QGemm / QLinearMatMul fusions want the weight's zero point, QLinearConv does not
    writer.weight_to_int(unit.weight, q, scale, unit.axis, zero_point=unit.node.op_type != "Conv")
    count(stats, "weights_quantized")
    if corrected:
        count(stats, "bias_corrected")
    if bias is None:
        return row
    # MatMul's following Add constant is treated as its bias: int32 like a Gemm bias, so that
    # onnxruntime's MatMul+Add -> Gemm fusion yields a QGemm (a float bias would leave a float Gemm)
    bias_name = unit.bias or unit.add_bias
    if x_scale is None:
        writer.store.set_array(bias_name, bias)
        return row
    bias_scale = (np.float64(x_scale) * scale).astype(np.float32)
    qb = np.clip(np.round(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
    writer.weight_to_int(bias_name, qb, bias_scale, 0, zero_point=False)
    count(stats, "biases_int32")
    return row


def _quantize_dynamic(units: list[_Unit], writer: _Writer, quantized: _Quantized, index: GraphIndex, make_name,
                      stats: dict, smooth_mul: bool, mul_sources: frozenset[str] | None = None) -> list[dict]:
    """Replace each dynamic unit by DynamicQuantizeLinear (one per input tensor) -> MatMulInteger -> Cast ->
    Mul(input scale x weight scales) (-> Add bias), the pattern onnxruntime fuses into DynamicQuantizeMatMul.

    ``index`` is of the graph being rewritten (migration folds into its constants); ``smooth_mul``: migrate
    with an explicit Mul where no LayerNorm absorbs it.
    """
    by_input: dict[str, list[_Unit]] = {}
    for unit in units:
        by_input.setdefault(unit.activations[0], []).append(unit)
    store, rows = writer.store, []
    for source, readers in by_input.items():
        s, alpha, ratio = quantized.smoothing(source, readers, store)
        where = writer.after.setdefault(source, []) if source in index.producer else writer.front
        x, how = source, "none"
        if s is not None:
            inverse = (1.0 / s).astype(np.float32)
            mine = {u.node.output[0] for u in readers}
            only_mine = not index.is_graph_output(source) and all(
                c.output[0] in mine for c in index.consumer_nodes(source))
            if only_mine and fold_inverse_scale(source, inverse, index, store, make_name):
                how = "folded"
            elif smooth_mul and (mul_sources is None or source in mul_sources):
                x, how = make_name(f"{source}_smoothed"), "mul"
                where.append(onnx.helper.make_node("Mul", [source, writer.initializer("smooth", inverse)], [x]))
            else:
                s, how = None, "no_fold"
            count(stats, f"smoothing_{how}")
        xq, xs, xz = make_name(f"{source}_q"), make_name(f"{source}_scale"), make_name(f"{source}_zero_point")
        where.append(onnx.helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz]))
        for unit in readers:
            q, scale, bias, error = quantized.dynamic_unit(unit, store, s)
            node, out = unit.node, unit.node.output[0]
            stored, _ = writer.store_int(unit.weight, q)
            product, as_int, as_float = make_name(f"{out}_scales"), make_name(f"{out}_int32"), make_name(f"{out}_float")
            bias_input = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            if bias is not None:  # bias-corrected: Gemm C, or the Add after a MatMul
                store.set_array(unit.bias or unit.add_bias, bias)
                count(stats, "bias_corrected")
            scaled = make_name(f"{out}_matmul") if bias_input else out
            replacement = [
                onnx.helper.make_node("Mul", [xs, writer.initializer("s", scale)], [product]),
                # symmetric weights: no zero point (an all-zero one per column costs a quarter of the scales)
                onnx.helper.make_node("MatMulInteger", [xq, stored, xz], [as_int], name=node.name),
                onnx.helper.make_node("Cast", [as_int], [as_float], to=onnx.TensorProto.FLOAT),
                onnx.helper.make_node("Mul", [as_float, product], [scaled])]
            if bias_input:
                replacement.append(onnx.helper.make_node("Add", [scaled, bias_input], [out]))
            writer.replaced[out] = replacement
            count(stats, "weights_quantized")
            count(stats, "dynamic_nodes")
            rows.append({"name": node.name, "op": node.op_type, "mode": "dynamic", "input": source, "weight_rel_err": error,
                         "smoothing": how, "smooth_alpha": alpha if how in ("folded", "mul") else 0.0,
                         "smooth_error_ratio": ratio})
    return rows


def _rebuild(graph: onnx.GraphProto, writer: _Writer, rename: dict[str, str]) -> None:
    """One pass over the nodes: consumers read the dequantized values, new nodes go after producers."""
    nodes = list(writer.front)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        nodes.extend(writer.replaced.get(node.output[0], (node,)) if node.output else (node,))
        for out in node.output:
            nodes.extend(writer.after.get(out, ()))
    replace_nodes(graph, nodes)


def _reads_at_half_precision(op: str, position: int) -> bool:
    """Whether input ``position`` of ``op`` is one where float16's 11-bit mantissa is far below the int8 noise."""
    positions = HALF_READERS.get(op, ())
    return positions is None or position in positions


def _half_constants(graph: onnx.GraphProto, make_name, stats: dict) -> None:
    """Store the small float32 initializers that int8 leaves around the integer weights (biases, LayerNorm gamma
    and beta, per-column weight scales: 3 % of the sample transformer's int8 file each, next to 24 % of int8
    weights) as float16. onnxruntime folds the Casts back to float32 at load time, before its fusions, so the
    session runs as before (checked: the same fused graph); without graph optimizations they run on every call,
    a few hundred values. Only constants that are read where an 11-bit mantissa is far below the int8 noise
    (HALF_READERS), and only where the largest value is in float16's range (HALF_RANGE): never weights of float
    layers or tables, nor Q/DQ parameters. The 1-D ones (the usual case) are stored as one concatenated float16
    tensor behind one Cast and one Split that gives back each old name (:func:`_join_halves`)."""
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, position))
    inputs = {i.name for i in graph.input} | {o.name for o in graph.output}
    halves: list[tuple[str, np.ndarray]] = []  # (float32 name, float16 values)
    removed: set[str] = set()
    for tensor in graph.initializer:
        uses = readers.get(tensor.name)
        if (tensor.data_type != onnx.TensorProto.FLOAT or not uses or tensor.name in inputs
                or 2 * int(np.prod(tensor.dims)) <= HALF_CAST_BYTES + 2 * len(tensor.name.encode())
                or not all(_reads_at_half_precision(op, position) for op, position in uses)):
            continue
        values = tensor_to_array(tensor)
        largest = float(np.max(np.abs(values)))  # NaN with any NaN
        if not HALF_RANGE[0] <= largest <= HALF_RANGE[1]:
            count(stats, "float16_constants_skipped_range")
            continue
        halves.append((tensor.name, values.astype(np.float16)))
        removed.add(tensor.name)
    if not halves:
        return
    filter_field(graph.initializer, lambda t: t.name not in removed)
    joined = [(name, half) for name, half in halves if half.ndim == 1]
    if len(joined) < 2:
        joined = []
    nodes = _join_halves(graph, joined, make_name) if joined else []
    for name, half in halves:
        if not joined or half.ndim != 1:
            stored = make_name(f"{name}_f16")
            graph.initializer.append(numpy_helper.from_array(half, stored))
            nodes.append(onnx.helper.make_node("Cast", [stored], [name], to=onnx.TensorProto.FLOAT))
    replace_nodes(graph, [*nodes, *graph.node])
    stats["float16_constants"] = len(halves)
    stats["float16_bytes_saved"] = sum(2 * half.size for _, half in halves)
    if joined:
        stats["float16_constants_joined"] = len(joined)


def _join_halves(graph: onnx.GraphProto, halves: list[tuple[str, np.ndarray]], make_name) -> list[onnx.NodeProto]:
    """One float16 tensor holding the 1-D ``halves`` end to end, and the Cast and Split that give back each
    float32 name: per constant, a Split output and a length instead of a tensor header and a Cast node
    (~50 bytes each on the sample transformer; the lengths are stored as varints, 1-2 bytes each).
    onnxruntime folds both nodes at load like the Casts they replace (checked: the same fused graph)."""
    joined, as_float, lengths = make_name("f16"), make_name("f32"), make_name("f16_lengths")
    graph.initializer.append(numpy_helper.from_array(np.concatenate([half for _, half in halves]), joined))
    graph.initializer.append(onnx.helper.make_tensor(lengths, onnx.TensorProto.INT64, [len(halves)],
                                                     [half.size for _, half in halves]))
    return [onnx.helper.make_node("Cast", [joined], [as_float], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Split", [as_float, lengths], [name for name, _ in halves], axis=0)]


# --------------------------------------------------------------------------- accuracy-aware mode


class _Trials:
    """Trial rewrites of the prepared model on a few calibration samples: each plans on the prepared
    model (its index and store, read only) and rewrites a copy with the weights, biases and ranges
    quantized once; trial names only need to be unique in the trial. With an ``executor`` (and the
    data a FeedSet), :meth:`cosines` scores its trials on the executor's workers."""

    def __init__(self, request: CalibrationRequest, quantized: _Quantized, feeds, executor=None,
                 samples: int = 0) -> None:
        """``samples``: how many of ``feeds`` the trials run (0: ``sensitivity_samples``)."""
        self.request, self.quantized = request, quantized
        samples = samples or quantized.opt.sensitivity_samples
        self.scorer = None
        if executor is not None and isinstance(feeds, FeedSet):
            self.scorer = TrialScorer(executor, request.model, feeds.window(0, samples))
        else:
            self.subset = list(itertools.islice(feeds, samples))
            self.reference = run_model(request.model, self.subset)
        self.window = executor.workers if self.scorer else 1  # trials scored at once
        self.names = unique_name_factory(request.model)

    def model(self, plan: _Plan) -> onnx.ModelProto:
        request = self.request
        trial = onnx.ModelProto()
        trial.CopyFrom(request.model)
        subgraphs = [(g, WeightStore(g), units) for g, (_, _, units)
                     in zip(itertools.islice(walk_graphs(trial.graph), 1, None), request.subgraphs)]
        self.rows = _apply(trial, WeightStore(trial.graph), plan, subgraphs, self.quantized, self.names, {},
                           request.index)  # the last trial's report rows
        return trial

    def cosine(self, trial: onnx.ModelProto) -> float:
        if self.scorer is not None:
            return self.scorer.cosines([trial])[0]
        return compare_outputs(self.reference, run_model(trial, self.subset), Tolerances(), exact=False).worst_cosine

    def cosines(self, plans: list[_Plan]) -> list[float]:
        """Each plan's trial cosine; ``window`` trials at a time are built here, then scored together."""
        scores: list[float] = []
        for start in range(0, len(plans), self.window):
            models = [self.model(p) for p in plans[start: start + self.window]]
            scores.extend(self.scorer.cosines(models) if self.scorer else [self.cosine(m) for m in models])
        return scores

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def _latency_ms(models: dict[str, onnx.ModelProto], feed: dict, runs: int) -> dict[str, float]:
    """onnxruntime latency per model (1 thread, all graph optimizations) as a deployed model runs, warm: the
    models take turns in blocks of AUTO_LATENCY_BLOCK runs (the first of a block, which finds caches that the
    other models used, is not counted), each round starting at the next model, so that load on the machine hits
    all alike; at least ``runs`` counted runs and AUTO_TIMING_S per model; the AUTO_LATENCY_QUANTILE percentile
    of each model's runs, since load from other processes only ever adds time."""
    sessions = {name: Session(m, optimize=True, threads=1) for name, m in models.items()}
    try:
        names = list(sessions)
        times: dict[str, list[float]] = {name: [] for name in names}
        total = dict.fromkeys(names, 0.0)
        rounds = 0
        while min(len(t) for t in times.values()) < runs or min(total.values()) < AUTO_TIMING_S:
            for name in names[rounds % len(names):] + names[:rounds % len(names)]:
                session = sessions[name]
                session.run(feed)
                for _ in range(AUTO_LATENCY_BLOCK - 1):
                    start = time.perf_counter()
                    session.run(feed)
                    elapsed = time.perf_counter() - start
                    times[name].append(elapsed)
                    total[name] += elapsed
            rounds += 1
    finally:
        for s in sessions.values():
            s.close()
    return {name: float(np.percentile(t, AUTO_LATENCY_QUANTILE) * 1e3) for name, t in times.items()}


def _choose_mode(request: CalibrationRequest, quantized: _Quantized, feeds, stats: dict, details: dict) -> _Plan:
    """Auto mode: of the candidate plans (static, static with narrow Convs float, dynamic, dynamic with the
    migration Muls that pay, dynamic with all of them, in order of simplicity) those that keep accuracy, by measured worst cosine on calibration
    samples (within AUTO_ERROR_SLACK / AUTO_ERROR_FLOOR of the best), and of
    those the fastest by measured latency, unless a simpler one is within AUTO_LATENCY_MARGIN of it."""
    trials = _Trials(request, quantized, feeds)
    plans = {"static": request.plan, **request.alternatives}
    models, cosines, mul_rows = {}, {}, []
    for name, plan in plans.items():
        models[name] = trials.model(plan)
        cosines[name] = trials.cosine(models[name])
        mul_rows = trials.rows if plan.smooth_mul else mul_rows
    best_error = min(1.0 - c for c in cosines.values())
    budget = max(best_error * AUTO_ERROR_SLACK, best_error + AUTO_ERROR_FLOOR)
    if "dynamic+mul" in plans:
        fewer = _fewer_muls(trials, plans["dynamic+mul"], mul_rows, budget)
        if fewer is not None:
            plans["dynamic+some_mul"], models["dynamic+some_mul"], cosines["dynamic+some_mul"] = fewer
    latency = _latency_ms(models, trials.subset[0], quantized.opt.latency_runs)
    # simplest first: every migration Mul is a node on every run, so the plan with all of them comes last (it
    # came before the one with fewer: within the latency margin, minilm_l3 kept 12 Muls where 3 did as well,
    # 4.3 % of its kernel time against 1.4 %)
    order = [n for n in plans if n != "dynamic+mul"] + ["dynamic+mul"] * ("dynamic+mul" in plans)
    close = [n for n in order if 1.0 - cosines[n] <= budget]
    fastest = min(latency[n] for n in close)
    chosen = next(n for n in close if latency[n] <= fastest * (1 + AUTO_LATENCY_MARGIN))
    details["candidates"] = [{"name": n, "calib_worst_cosine": cosines[n], "latency_ms": latency[n],
                              "chosen": n == chosen} for n in plans]
    stats["mode_dynamic"] = int(plans[chosen].dynamic)
    stats["narrow_convs_float"] = len(plans[chosen].narrow_float)
    if plans[chosen].mul_sources is not None:
        stats["smoothing_mul_dropped"] = len({r["input"] for r in mul_rows if r.get("smoothing") == "mul"}
                                             - plans[chosen].mul_sources)
    stats.update({f"calib_cosine_{n}": cosines[n] for n in plans})
    return plans[chosen]


def _replan(request: CalibrationRequest, opt: QuantizeOptions, plan: _Plan, float_nodes: set[str]) -> _Plan:
    """``plan``'s form (static / dynamic, narrow Convs, migration Muls) with the named heavy nodes float."""
    replanned = _plan(request.index, request.store, opt, float_nodes, {}, dynamic=plan.dynamic,
                      smooth_mul=plan.smooth_mul, narrow_float=plan.narrow_float)
    return dataclasses.replace(replanned, mul_sources=plan.mul_sources)


def _fewer_muls(trials: _Trials, plan: _Plan, rows: list[dict], budget: float
                ) -> tuple[_Plan, onnx.ModelProto, float] | None:
    """The migration Muls cost run time (12 elementwise passes, ~5 % of minilm_l3), and most buy little: drop
    them one input tensor at a time, least estimated gain first (AUTO_MUL_TRIALS at most), while the
    calibration error stays within ``budget`` (what auto counts as accurate). The plan with the Muls left,
    its trial model and cosine; None when none could go or all could (that is the ``dynamic`` candidate)."""
    gain: dict[str, float] = {}
    for row in rows:
        if row.get("smoothing") == "mul":
            gain[row["input"]] = min(gain.get(row["input"], 1.0), row["smooth_error_ratio"])
    kept, best = set(gain), None
    for source in sorted(gain, key=lambda s: -gain[s])[:AUTO_MUL_TRIALS]:
        candidate = dataclasses.replace(plan, mul_sources=frozenset(kept - {source}))
        model = trials.model(candidate)
        cosine = trials.cosine(model)
        if 1.0 - cosine <= budget:
            kept.discard(source)
            best = (candidate, model, cosine)
    return best if best is not None and kept else None


def _trial_cosines(request: CalibrationRequest, plan: _Plan, trials: _Trials
                   ) -> Callable[[list[set[str]]], list[float]]:
    """Calibration worst cosine of ``plan``'s form with each set of named heavy nodes kept float."""
    opt = trials.quantized.opt
    excluded = set(opt.exclude_nodes)

    def cosines(float_nodes: list[set[str]]) -> list[float]:
        return trials.cosines([_replan(request, opt, plan, excluded | nodes) for nodes in float_nodes])

    return cosines


def _layer_sensitivity(plan: _Plan, cosines: Callable[[list[set[str]]], list[float]]) -> dict[str, float]:
    """Each heavy node's calibration cosine when it alone is quantized (independent trials)."""
    names = [u.node.name for u in plan.units]
    everything = set(names)
    return dict(zip(names, cosines([everything - {n} for n in names])))


def _keep_sensitive(request: CalibrationRequest, plan: _Plan, quantized: _Quantized, feeds, stats,
                    sensitivity: dict[str, float], executor=None) -> set[str]:
    """Names of the heavy nodes to keep in float so that calibration cosine >= min_cosine: the most sensitive
    first, until the score is reached; ``sensitivity`` receives each node's cosine when it alone is quantized.

    The greedy steps keep float the first ``j`` nodes of one fixed ranking, so their trials are independent:
    ``trials.window`` of them are scored at once (on as many workers), the first to reach the target wins,
    as when they are tried one by one."""
    trials = _Trials(request, quantized, feeds, executor)
    try:
        cosines = _trial_cosines(request, plan, trials)
        sensitivity.update(_layer_sensitivity(plan, cosines))
        order = sorted(sensitivity, key=lambda n: sensitivity[n])
        for start in range(0, len(order) + 1, trials.window):
            steps = range(start, min(start + trials.window, len(order) + 1))
            for kept, score in zip(steps, cosines([set(order[:j]) for j in steps])):
                if score >= quantized.opt.min_cosine or kept == len(order):
                    stats["calib_cosine"] = score
                    return set(order[:kept])
    finally:
        trials.close()
    raise AssertionError("unreachable: the last step keeps every node float")
