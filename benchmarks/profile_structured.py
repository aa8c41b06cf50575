"""Where onnxruntime's time goes in a dense and a structurally pruned transformer, node by node.

    python benchmarks/profile_structured.py [--model samples/transformer|minilm_l3] [--pipeline P]
        [--rounds 1500] [--threads 1 2] [--batches 1 64] [--nodes]

The evidence behind bench_structured's one-sample figures. Both models go through the same clean-ups
(``cleanup``); the pruned one first through ``--pipeline`` (default: the recipe the README gives,
``prune-neurons(ratio=0.25,method=fluctuation,scope=global),distill,zero-rows``), so the ratio is
pruning's alone. For every intra_op_num_threads and batch (64 samples only where the batch is
symbolic), three views of the same models, each timed interleaved (every round runs every model
once, in turn, so load from elsewhere hits all alike):
- latency: median and interquartile range of plain ``session.run`` calls, beside an empty model's
  (the floor any run from Python pays); the speed-up is the median (IQR) over rounds of the dense
  model's time over the pruned one's in the same round (a busy spell slowing whole rounds cancels);
- onnxruntime's profiler: mean kernel time (middle 90 % of the runs) of every node of the optimized
  graph, summed by op type;
  it times the kernels only (and slows the run several-fold at one sample), so per-node work
  outside kernels shows as the gap to the run time;
- isolated nodes (one thread only): every node of onnxruntime's optimized graph run alone on its
  real inputs (constants as initializers, no further optimization), less the empty model's time in
  the same round: the node's own cost with its per-node work, which adds up to about the run time.
Sessions with more than one thread do not spin (``session.intra_op.allow_spinning=0``): timed in
turn, the idle sessions' spinning workers would take the cores from the one running.
``--fused`` (samples/transformer only) adds a what-if: both models' block rewritten by hand into
onnxruntime's contrib kernels (Attention with packed Q/K/V, SkipLayerNormalization, BiasGelu: 9
nodes instead of 32), the least per-node work onnxruntime's CPU kernels allow; the ratio it
reaches bounds what any clean-up could give pruning on one sample.
``--widths`` times what a pruned MLP width costs instead: 8 chained pairs of MatMuls
[tokens, 64] x [64, N] x [N, 64] (the sample's shapes) for N from 128 to 256 in steps of 8, on one
sample and on 64, interleaved: whether a width off a multiple of 16 (MLAS's SGEMM column block on
x64) is paid as the next multiple.
Prints markdown tables (by op type; ``--nodes``: every node); writes
benchmarks/out/profile_structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy in distill: one thread, like onnxruntime

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from common import SAMPLES, SHARED_MODELS, interleaved_times  # noqa: E402
from onnxopt.data import load_feeds, name_positional_inputs  # noqa: E402

PIPELINE = "prune-neurons(ratio=0.25,method=fluctuation,scope=global),distill,zero-rows"
CLEANUP = "cleanup"


def session(model: onnx.ModelProto, threads: int, optimize: bool = True, profile: str | None = None,
            optimized_path: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads > 1:  # idle workers of the sessions not running would spin on the cores of the one that is
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def interleaved_us(runs: list[tuple[ort.InferenceSession, dict]], rounds: int) -> np.ndarray:
    """(rounds, len(runs)) wall times in µs, every round running each session once, in turn."""
    return interleaved_times(runs, rounds, warmup=20) * 1e6


def empty_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same inputs, the first one returned through an Identity: what a run costs without any work."""
    first = model.graph.input[0]
    graph = helper.make_graph([helper.make_node("Identity", [first.name], ["out"])], "empty", list(model.graph.input),
                              [helper.make_tensor_value_info("out", first.type.tensor_type.elem_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=model.ir_version)


def optimized_graph(model: onnx.ModelProto, threads: int, folder: Path) -> onnx.ModelProto:
    path = str(folder / "optimized.onnx")
    session(model, threads, optimized_path=path)
    return onnx.load(path)


def isolated_nodes(optimized: onnx.ModelProto, feed: dict, threads: int
                   ) -> list[tuple[onnx.NodeProto, ort.InferenceSession, dict]]:
    """Every node of ``optimized`` as a one-node model with its real inputs (from one unoptimized run)."""
    constants = {t.name: t for t in optimized.graph.initializer}
    produced = [name for node in optimized.graph.node for name in node.output if name]
    probe = onnx.ModelProto()
    probe.CopyFrom(optimized)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in produced)
    values = dict(zip(produced, session(probe, threads, optimize=False).run(None, feed)))
    values.update(feed)
    nodes = []
    for node in optimized.graph.node:
        live = [name for name in node.input if name and name not in constants]
        graph = helper.make_graph(
            [node], node.name or node.op_type,
            [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(values[name].dtype),
                                           values[name].shape) for name in live],
            [helper.make_empty_tensor_value_info(name) for name in node.output if name],
            [constants[name] for name in dict.fromkeys(node.input) if name in constants])
        alone = helper.make_model(graph, opset_imports=optimized.opset_import, ir_version=optimized.ir_version)
        nodes.append((node, session(alone, threads, optimize=False), {name: values[name] for name in live}))
    return nodes


def kernel_profile(model: onnx.ModelProto, feed: dict, threads: int, runs: int, folder: Path
                   ) -> tuple[dict[str, float], float]:
    """Mean kernel µs per node name over ``runs`` profiled runs, and the mean profiled run time (trimmed)."""
    s = session(model, threads, profile=str(folder / "profile"))
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    kernels, run_times = defaultdict(list), []
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernels[event["name"][:-len("_kernel_time")]].append(event["dur"])
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            run_times.append(event["dur"])
    skip = runs // 5  # warm-up
    return ({name: _trimmed_mean(d[skip:]) for name, d in kernels.items()}, _trimmed_mean(run_times[skip:]))


def _trimmed_mean(values: list[float]) -> float:
    """The mean of the middle 90 %: the profiler's whole-µs times average to fractions, and the few runs
    another process interrupted (milliseconds on a shared machine) do not swamp it."""
    ordered = np.sort(values)
    cut = len(ordered) // 20
    return float(np.mean(ordered[cut:len(ordered) - cut]))


def fused_sample_block(model: onnx.ModelProto) -> onnx.ModelProto:
    """samples/transformer's block (dense or pruned: widths and head count from its weights) in
    onnxruntime's contrib kernels; the sample's 16-wide heads and epsilon."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qkv = ("q", "k", "v")
    packed = [numpy_helper.from_array(np.concatenate([weights[f"{p}_weight"] for p in qkv], axis=1), "qkv_weight"),
              numpy_helper.from_array(np.concatenate([weights[f"{p}_bias"] for p in qkv]), "qkv_bias")]
    kept = ["ln1_scale", "ln1_bias", "out_weight", "out_bias", "ln2_scale", "ln2_bias", "ffn1_weight", "ffn1_bias",
            "ffn2_weight", "ffn2_bias"]
    heads = weights["q_weight"].shape[1] // 16
    ms = "com.microsoft"
    nodes = [helper.make_node("LayerNormalization", ["tokens", "ln1_scale", "ln1_bias"], ["x"], axis=-1, epsilon=1e-5),
             helper.make_node("Attention", ["x", "qkv_weight", "qkv_bias"], ["ctx"], domain=ms, num_heads=heads),
             helper.make_node("MatMul", ["ctx", "out_weight"], ["attended"]),
             helper.make_node("SkipLayerNormalization", ["attended", "tokens", "ln2_scale", "ln2_bias", "out_bias"],
                              ["y", "", "", "h"], domain=ms, epsilon=1e-5),
             helper.make_node("MatMul", ["y", "ffn1_weight"], ["f"]),
             helper.make_node("BiasGelu", ["f", "ffn1_bias"], ["gelu"], domain=ms),
             helper.make_node("MatMul", ["gelu", "ffn2_weight"], ["mlp"]),
             helper.make_node("Add", ["mlp", "ffn2_bias"], ["mlp_biased"]),
             helper.make_node("Add", ["h", "mlp_biased"], [model.graph.output[0].name])]
    for i, node in enumerate(nodes):  # the profiler reports kernels by node name
        node.name = f"fused_{i}_{node.op_type}"
    graph = helper.make_graph(nodes, "fused", list(model.graph.input), list(model.graph.output),
                              packed + [numpy_helper.from_array(weights[n], n) for n in kept])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)],
                             ir_version=model.ir_version)


def shapes(node: onnx.NodeProto, feed: dict) -> str:
    return str([list(feed[name].shape) for name in node.input if name in feed])


def profile_case(models: dict[str, onnx.ModelProto], feed: dict, threads: int, rounds: int) -> dict:
    """Latency, profiler and isolated-node views of ``models`` on ``feed`` with ``threads`` intra-op threads."""
    names = list(models)
    floor = session(empty_model(next(iter(models.values()))), threads)
    sessions = [session(models[name], threads) for name in names]
    wall = interleaved_us([(s, feed) for s in sessions] + [(floor, feed)], rounds)
    result = {"threads": threads, "batch": int(next(iter(feed.values())).shape[0]),
              "floor_us": float(np.median(wall[:, -1])), "models": {}}
    isolated_all, layouts = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            optimized = optimized_graph(models[name], threads, Path(folder))
            kernels, profiled_run = kernel_profile(models[name], feed, threads, max(rounds // 2, 50), Path(folder))
            nodes = isolated_nodes(optimized, feed, threads) if threads == 1 else \
                [(node, None, {}) for node in optimized.graph.node]
            layouts.append((name, nodes, kernels, profiled_run))
            isolated_all += [(s, inputs) for _, s, inputs in nodes if s is not None]
    node_us = [None] * sum(len(nodes) for _, nodes, _, _ in layouts)
    if isolated_all:  # against an empty model made like the one-node ones
        alone_floor = session(empty_model(next(iter(models.values()))), threads, optimize=False)
        node_wall = interleaved_us(isolated_all + [(alone_floor, feed)], max(rounds // 2, 50))
        node_us = np.median(node_wall[:, :-1] - node_wall[:, -1:], axis=0).tolist()  # paired: the round's empty run
        result["isolated_floor_us"] = float(np.median(node_wall[:, -1]))
    offset = 0
    for i, (name, nodes, kernels, profiled_run) in enumerate(layouts):
        rows = []
        for node, _, inputs in nodes:
            rows.append({"node": node.name, "op": node.op_type, "inputs": shapes(node, inputs),
                         "isolated_us": node_us[offset], "kernel_us": kernels.get(node.name, 0.0)})
            offset += 1
        q1, median, q3 = np.percentile(wall[:, i], [25, 50, 75])
        result["models"][name] = {"median_us": float(median), "iqr_us": [float(q1), float(q3)],
                                  "profiled_run_us": profiled_run, "nodes": rows}
    column = {name: i for i, name in enumerate(names)}
    result["speedups"] = {}  # median and IQR over rounds of the two times in one round: busy spells cancel
    for dense, pruned in (("dense", "pruned"), ("dense fused", "pruned fused")):
        if dense in column and pruned in column:
            ratio = wall[:, column[dense]] / wall[:, column[pruned]]
            result["speedups"][f"{dense} / {pruned}"] = [float(q) for q in np.percentile(ratio, [50, 25, 75])]
    return result


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _total(values: list[float | None]) -> float | None:
    """The sum, or None where a part was not measured (isolated nodes with more than one thread)."""
    return None if any(v is None for v in values) else float(sum(values))


def op_table(case: dict) -> str:
    names = list(case["models"])
    ops: dict[str, dict[str, list]] = defaultdict(lambda: {n: [] for n in names})
    for name in names:
        for row in case["models"][name]["nodes"]:
            ops[row["op"]][name].append(row)
    cells = {op: {n: (len(rows), _total([r["isolated_us"] for r in rows]), sum(r["kernel_us"] for r in rows))
                  for n, rows in per_model.items()} for op, per_model in ops.items()}
    header = " | ".join(f"{n}: nodes, isolated µs, profiler µs" for n in names)
    lines = [f"| op | {header} |", "|---|" + "---|" * len(names)]
    for op, per_model in sorted(cells.items(), key=lambda kv: -kv[1][names[0]][2]):
        lines.append(f"| {op} | " + " | ".join(f"{c[0]}, {_us(c[1])}, {c[2]:.2f}" for c in per_model.values()) + " |")
    totals = [(sum(c[n][0] for c in cells.values()), _total([c[n][1] for c in cells.values() if c[n][0]]),
               sum(c[n][2] for c in cells.values())) for n in names]
    lines.append("| **sum** | " + " | ".join(f"{k}, {_us(i)}, {p:.2f}" for k, i, p in totals) + " |")
    return "\n".join(lines)


def summary_table(cases: list[dict]) -> str:
    names = list(cases[0]["models"])
    cells = " | ".join(f"{n} µs (IQR) · profiled run · Σ isolated + empty" for n in names)
    lines = [f"| threads | batch | empty run µs | {cells} | speed-up: median (IQR) of per-round ratios |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for case in cases:
        cells = []
        for name in names:
            m = case["models"][name]
            isolated = _total([r["isolated_us"] for r in m["nodes"]])
            if isolated is not None:
                isolated += case["isolated_floor_us"]
            cells.append(f"{m['median_us']:.1f} ({m['iqr_us'][0]:.1f}–{m['iqr_us'][1]:.1f}) · "
                         f"{m['profiled_run_us']:.1f} · {_us(isolated)}")
        ratios = [f"{pair}: {m:.3f}× ({q1:.3f}–{q3:.3f})" for pair, (m, q1, q3) in case["speedups"].items()]
        lines.append(f"| {case['threads']} | {case['batch']} | {case['floor_us']:.1f} | " + " | ".join(cells)
                     + f" | {'; '.join(ratios)} |")
    return "\n".join(lines)


def node_table(case: dict) -> str:
    names = list(case["models"])
    lines = [f"| # | op | {names[0]} inputs | " + " | ".join(f"{n} isolated µs · profiler µs" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for i, row in enumerate(case["models"][names[0]]["nodes"]):
        others = [case["models"][n]["nodes"] for n in names]
        cells = [f"{_us(rows[i]['isolated_us'])} · {rows[i]['kernel_us']:.2f}" if i < len(rows)
                 and rows[i]["op"] == row["op"] else "—" for rows in others]
        lines.append(f"| {i} | {row['op']} | {row['inputs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def width_sweep(widths: range, batches: list[int], rounds: int) -> str:
    """Median µs per MatMul pair of a chain of 8, per MLP width N and batch (16 tokens, model width 64)."""
    rng = np.random.default_rng(0)

    def chain(width: int) -> onnx.ModelProto:
        nodes, weights, previous = [], [], "x"
        for i in range(8):
            weights += [numpy_helper.from_array(rng.standard_normal((64, width)).astype(np.float32) / 8, f"up{i}"),
                        numpy_helper.from_array(rng.standard_normal((width, 64)).astype(np.float32) / 8, f"down{i}")]
            nodes += [helper.make_node("MatMul", [previous, f"up{i}"], [f"hidden{i}"]),
                      helper.make_node("MatMul", [f"hidden{i}", f"down{i}"], [f"y{i}"])]
            previous = f"y{i}"
        graph = helper.make_graph(nodes, "widths", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                  ["batch", 16, 64])],
                                  [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)], weights)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    sessions = [session(chain(w), 1) for w in widths]
    lines = ["| N | " + " | ".join(f"batch {b}: µs per pair (× N=128)" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    columns = []
    for batch in batches:
        feed = {"x": rng.standard_normal((batch, 16, 64)).astype(np.float32)}
        wall = interleaved_us([(s, feed) for s in sessions], rounds if batch == 1 else max(rounds // 10, 20))
        columns.append(np.median(wall, axis=0) / 8)
    for i, width in enumerate(widths):
        lines.append(f"| {width} | " + " | ".join(f"{c[i]:.2f} ({c[i] / c[0]:.2f}×)" for c in columns) + " |")
    return "\n".join(lines)


def load_case(name: str, models: Path) -> tuple[onnx.ModelProto, Path, Path]:
    folder = SAMPLES if name.startswith("samples/") else models / name
    if name.startswith("samples/"):
        stem = name.split("/", 1)[1]
        return onnx.load(folder / f"{stem}.onnx"), folder / f"{stem}.calib.npz", folder / f"{stem}.eval.npz"
    return onnx.load(folder / "model.onnx"), folder / "calib.npz", folder / "eval.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="samples/transformer", help="samples/NAME or a folder of --models")
    parser.add_argument("--models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--pipeline", default=PIPELINE)
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--nodes", action="store_true", help="also print every node")
    parser.add_argument("--fused", action="store_true", help="samples/transformer: also both in contrib kernels")
    parser.add_argument("--widths", action="store_true", help="only time MLP widths 128-256 (MatMul pairs)")
    args = parser.parse_args()
    if args.widths:
        print(width_sweep(range(128, 257, 8), args.batches, args.rounds))
        return
    if args.fused and args.model != "samples/transformer":
        parser.error("--fused rewrites samples/transformer's block only")
    model, calib_path, eval_path = load_case(args.model, args.models)
    calib = name_positional_inputs(load_feeds(calib_path), model)
    samples = list(name_positional_inputs(load_feeds(eval_path), model))
    models = {"dense": onnxopt.optimize(model, CLEANUP, validate=False).model,
              "pruned": onnxopt.optimize(model, f"{args.pipeline},{CLEANUP}", calib=calib, validate=False).model}
    if args.fused:
        models.update({f"{name} fused": fused_sample_block(m) for name, m in list(models.items())})
        models = {name: models[name] for name in ("dense", "dense fused", "pruned fused", "pruned")}
        feed = samples[0]
        for name in ("dense fused", "pruned fused"):  # the same function as the graph it stands for
            reference = name.removesuffix(" fused")
            fused, unfused = (session(models[n], 1).run(None, feed)[0] for n in (name, reference))
            error = np.abs(fused - unfused)
            print(f"{name}: max |difference| to {reference} {error.max():.2e}")
    symbolic = all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)
    load = os.getloadavg()[0]
    cases = []
    for batch in args.batches if symbolic else [1]:
        feed = {name: np.concatenate([s[name] for s in samples[:batch]]) for name in samples[0]}
        rounds = args.rounds if batch == 1 else max(args.rounds // 20, 20)
        for threads in args.threads:
            cases.append(profile_case(models, feed, threads, rounds))
    load = (load, os.getloadavg()[0])
    print(f"{args.model}: dense = `{CLEANUP}`, pruned = `{args.pipeline},{CLEANUP}`; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after\n")
    print(summary_table(cases))
    for case in cases:
        print(f"\nthreads {case['threads']}, batch {case['batch']}:\n")
        print(op_table(case))
        if args.nodes:
            print()
            print(node_table(case))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "profile_structured.json").write_text(json.dumps({"model": args.model, "pipeline": args.pipeline,
                                                             "load_average": load, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
