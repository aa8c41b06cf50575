"""Model summaries (`onnxopt info`), step records, and their JSON / terminal renderings."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .data import input_dims, model_inputs
from .graph import WeightStore, constant_tensor, model_graphs, walk_nodes
from .tensors import FLOAT_TYPES, count_zeros, external_info, is_external, tensor_nbytes
from .modelio import model_tensors, write_file_atomically

def weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node tensors of every graph (each weight once)."""
    tensors = []
    for graph in model_graphs(model):
        tensors.extend(graph.initializer)
        for node in graph.node:
            tensor = constant_tensor(node)
            if tensor is not None:
                tensors.append(tensor)
    return tensors


def size_summary(model: onnx.ModelProto, weights: list[onnx.TensorProto] | None = None) -> dict[str, int]:
    """Nodes, parameters and weight bytes: cheap, reads no external data."""
    weights = weight_tensors(model) if weights is None else weights
    return {
        "nodes": sum(1 for _ in walk_nodes(model.graph)),
        "params": sum(int(np.prod(t.dims, dtype=np.int64)) for t in weights),
        "weight_bytes": sum(tensor_nbytes(t) for t in weights),
    }


def model_info(model: onnx.ModelProto, path: str | Path | None = None) -> dict[str, Any]:
    """Everything `onnxopt info` shows, as JSON-ready data."""
    weights = weight_tensors(model)
    float_weights = [t for t in weights if t.data_type in FLOAT_TYPES]
    zeros = sum(count_zeros(t) for t in float_weights)  # in chunks: memory stays flat on big models
    total = sum(int(np.prod(t.dims, dtype=np.int64)) for t in float_weights)
    external_files: Counter[str] = Counter()
    for tensor in model_tensors(model):
        if is_external(tensor):
            info = external_info(tensor)
            external_files[Path(info["location"]).name] += int(info.get("length", tensor_nbytes(tensor)))
    graphs = list(model_graphs(model))
    return {
        "path": str(path) if path else None,
        "ir_version": model.ir_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value_info(v) for v in model_inputs(model)],
        "outputs": [_value_info(v) for v in model.graph.output],
        "ops": dict(sorted(Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
                                   for n in walk_nodes(model.graph)).items(), key=lambda kv: (-kv[1], kv[0]))),
        **size_summary(model, weights),
        "initializers": len(model.graph.initializer),
        "constant_nodes": sum(1 for n in walk_nodes(model.graph) if n.op_type == "Constant"),
        "weight_sparsity": zeros / total if total else 0.0,
        "subgraphs": len(graphs) - 1,
        "functions": [f"{f.domain}.{f.name}" if f.domain else f.name for f in model.functions],
        "external_data": dict(external_files),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    dims = input_dims(value)
    dtype = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    return {"name": value.name, "dtype": dtype, "shape": None if dims is None else ["?" if d is None else d for d in dims]}


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"model       {info['path'] or '(in memory)'}",
        f"ir/opset    IR {info['ir_version']}, " + ", ".join(f"{d} {v}" for d, v in info["opset"].items()),
    ]
    if info["producer"]:
        lines.append(f"producer    {info['producer']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            lines.append(f"{kind[:-1]:<11} {v['name']}: {v['dtype']} {v['shape']}")
    lines.append(f"nodes       {info['nodes']} ({info['subgraphs']} subgraphs, {info['constant_nodes']} Constant)")
    lines.append(f"params      {info['params']:,} in {human_bytes(info['weight_bytes'])} "
                 f"({info['initializers']} initializers), sparsity {info['weight_sparsity']:.1%}")
    for name, size in info["external_data"].items():
        lines.append(f"external    {name}: {human_bytes(size)}")
    if info["functions"]:
        lines.append(f"functions   {', '.join(info['functions'])}")
    lines.append("ops         " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SLOWER_RATIO = 1.05  # a median per-run latency ratio above this is reported as slower


def layer_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.TensorProto, Callable]]:
    """Layers (Conv / Gemm / MatMul nodes with a constant weight, in every graph) by node name (or first
    output): the node, the stored weight tensor, and a function giving its float values, dequantized
    when the weight is int8 behind a DequantizeLinear. Values are read only when asked, one layer at a time."""
    layers = {}
    for graph in model_graphs(model):
        store = WeightStore(graph)
        dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in store}
        for node in graph.node:
            if node.op_type not in LAYER_OPS or len(node.input) < 2:
                continue
            weight, key = node.input[1], node.name or node.output[0]
            if weight in store:
                layers[key] = (node, store.tensor(weight), lambda w=weight, s=store: s.array(w))
            elif weight in dequantized:
                dq = dequantized[weight]
                layers[key] = (node, store.tensor(dq.input[0]), lambda d=dq, s=store: _dequantize(d, s))
    return layers


def _dequantize(node: onnx.NodeProto, store: WeightStore) -> np.ndarray:
    q = store.array(node.input[0]).astype(np.float64)
    scale = store.array(node.input[1]).astype(np.float64)
    zero = store.array(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] in store else 0.0
    if np.ndim(scale) == 1 and q.ndim > 1:  # per-channel along ``axis`` (default 1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return (q - zero) * scale


def layer_table(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> list[dict[str, Any]]:
    """Per layer of ``model``: op, weight shape and dtype, sparsity (exact zeros); with ``original``, the same
    layer's sparsity there and the relative L2 change of its weight (a quantized layer's: its quantization error)."""
    before = layer_weights(original) if original is not None else {}
    rows = []
    for name, (node, tensor, values) in layer_weights(model).items():
        if name in before or tensor.name != node.input[1]:
            after = values()
            shape, zeros = list(after.shape), int(np.count_nonzero(after == 0))
        else:  # a stored weight compared with nothing: its zeros are counted without holding it
            shape, zeros = list(tensor.dims), count_zeros(tensor)
        params = int(np.prod(shape, dtype=np.int64))
        row = {"name": name, "op": node.op_type, "weight": tensor.name, "shape": shape,
               "dtype": onnx.TensorProto.DataType.Name(tensor.data_type).lower(),
               "params": params, "sparsity": zeros / params if params else 0.0}
        if name in before:
            old = before[name][2]()
            norm = float(np.linalg.norm(old))
            row["sparsity_before"] = _sparsity(old)
            row["weight_change"] = float(np.linalg.norm(after - old)) / norm if norm and old.shape == after.shape else None
        rows.append(row)
    return rows


def _sparsity(values: np.ndarray) -> float:
    return float(np.count_nonzero(values == 0)) / values.size if values.size else 0.0


def report_warnings(document: dict[str, Any]) -> list[str]:
    """What a user should not miss in a report: a step that grew the weights, a result that runs slower."""
    warnings = []
    for step in document.get("steps", []):
        before, after = step["before"]["weight_bytes"], step["after"]["weight_bytes"]
        if after > before:
            warnings.append(f"step {step['index']} '{step['name']}' made the weights larger: "
                            f"{human_bytes(before)} -> {human_bytes(after)} (+{after / before - 1:.1%})"
                            if before else f"step {step['index']} '{step['name']}' added weights")
    latency = document.get("latency")
    if latency and len(latency["models"]) > 1:
        first, result = latency["models"][0], latency["models"][-1]
        ratio = result["vs_first"]["latency"]
        if ratio > SLOWER_RATIO:
            warnings.append(f"the result runs slower than the original: median {result['median_ms']:.4g} ms vs "
                            f"{first['median_ms']:.4g} ms ({ratio:.2f}x, median of per-run ratios)")
        if result["file_bytes"] > first["file_bytes"]:
            warnings.append(f"the result's file is larger than the original's: {human_bytes(result['file_bytes'])} "
                            f"vs {human_bytes(first['file_bytes'])}")
    return warnings


@dataclass
class StepRecord:
    index: int
    name: str
    step: str
    options: dict[str, Any]
    exact: bool
    seconds: float
    modified: bool
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, int | float]
    checks: dict[str, Any] = field(default_factory=dict)
    vs_previous: dict[str, Any] | None = None
    vs_original: dict[str, Any] | None = None
    accuracy: float | None = None
    passed: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    pipeline: str
    input: str | None = None
    output: str | None = None
    feeds: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    failure: str | None = None
    reproducer: str | None = None
    gates: dict[str, Any] = field(default_factory=dict)  # what validation applied: names, noise, tolerances
    layers: list[dict[str, Any]] = field(default_factory=list)  # per layer of the result: see layer_table
    latency: dict[str, Any] | None = None  # Benchmark.to_dict() of the original vs the result
    executor: dict[str, Any] | None = None  # name, workers, shards, tasks: where the data-parallel work ran

    @property
    def passed(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return jsonable({
            "onnxopt_version": __version__,
            "pipeline": self.pipeline,
            "input": self.input,
            "output": self.output,
            "passed": self.passed,
            "failure": self.failure,
            "reproducer": self.reproducer,
            "feeds": self.feeds,
            "gates": self.gates,
            "steps": [asdict(s) for s in self.steps],
            "layers": self.layers,
            "latency": self.latency,
            "executor": self.executor or {"name": "in-process", "workers": 1},
        })

    def write_json(self, path: str | Path) -> None:
        write_file_atomically(path, json.dumps(self.to_dict(), indent=2).encode())

    def write_html(self, path: str | Path) -> None:
        """One self-contained page (plots inline when matplotlib is installed): see report_html."""
        from .report_html import render_html

        write_file_atomically(path, render_html(self.to_dict()).encode())

    def table(self) -> str:
        """One line per step: what changed, how long, and how close the outputs stayed."""
        header = (f"{'#':>2}  {'step':<28} {'nodes':>13} {'params':>21} {'bytes':>23} {'sec':>7}  {'cosine':>9} "
                  f"{'max abs':>9} {'accuracy':>8}  verdict")
        rows = [header, "-" * len(header)]
        for s in self.steps:
            metrics = s.vs_original or {}
            outputs = metrics.get("outputs", {})
            cosine = min((float(o["cosine"]) for o in outputs.values()), default=None)  # "nan" from NaN outputs
            max_abs = max((float(o["max_abs"]) for o in outputs.values()), default=None)
            rows.append(
                f"{s.index:>2}  {s.name:<28} {s.before['nodes']:>6}>{s.after['nodes']:<6} "
                f"{s.before['params']:>10}>{s.after['params']:<10} "
                f"{human_bytes(s.before['weight_bytes']):>11}>{human_bytes(s.after['weight_bytes']):<11} "
                f"{s.seconds:>7.3f}  {'-' if cosine is None else f'{cosine:.6f}':>9} "
                f"{'-' if max_abs is None else f'{max_abs:.2e}':>9} "
                f"{'-' if s.accuracy is None else f'{s.accuracy:.2%}':>8}  {'ok' if s.passed else 'FAILED'}"
            )
        for s in self.steps:
            interesting = {k: v for k, v in s.stats.items() if v}
            if interesting:
                rows.append(f"    {s.name}: " + ", ".join(f"{k}={_short(v)}" for k, v in interesting.items()))
        for s in self.steps:  # learned solvers: the schedule and where each layer's loss went
            for layer, curve in s.details.get("loss_curves", {}).items():
                loss = curve["loss"]
                rows.append(f"    {s.name} loss {layer} ({curve['schedule']}, {curve['optimizer']}, {curve['steps']} steps): "
                            f"{loss[0]:.4g} -> {loss[-1]:.4g}")
        if self.feeds:
            accuracy = self.feeds.get("accuracy")
            rows.append(f"feeds: {self.feeds.get('origin')} ({self.feeds.get('samples')} samples)"
                        + ("" if accuracy is None else f"; original accuracy {accuracy:.2%}")
                        + "".join(f"; {n}" for n in self.feeds.get("notes", [])[1:]))
        if self.latency:
            first, last = self.latency["models"][0], self.latency["models"][-1]
            rows.append(f"latency: original {first['median_ms']:.4g} ms, result {last['median_ms']:.4g} ms "
                        f"({last['vs_first']['latency']:.2f}x; {self.latency['runs']} interleaved runs, "
                        f"{self.latency['threads']} thread(s)); file {human_bytes(first['file_bytes'])} -> "
                        f"{human_bytes(last['file_bytes'])}")
        rows.extend(f"warning: {w}" for w in report_warnings(self.to_dict()))
        exact = self.gates.get("exact")
        if exact and exact.get("noise"):
            rows.append(f"exact gate: atol = max({exact['min_atol']:g}, {exact['noise_factor']:g} x float noise) per output; "
                        + ", ".join(f"{name} noise {_short(float(n))} -> atol {_short(float(exact['atol'][name]))}"
                                    for name, n in exact["noise"].items()))
        applied = self.gates.get("applied")
        suffix = f" ({'; '.join(applied)})" if applied else ""
        rows.append(f"verdict: {'PASSED' + suffix if self.passed else 'FAILED: ' + str(self.failure)}")
        if self.reproducer:
            rows.append(f"reproducer: {self.reproducer}")
        return "\n".join(rows)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else ("inf" if f > 0 else "-inf" if f < 0 else "nan")
    return value
