"""Where quantize's calibration time goes, against a plain fp32 pass (the evidence behind the 1.5x target).

    python benchmarks/profile_calibration.py [--model ../shared/models/ppocr_cls]

For one model folder (model.onnx, calib.npz) it prints, for the model quantize calibrates (BatchNorm
and biases folded) in the joined batch size calibration picks:
- onnxruntime run time per batch, plain and with every observed tensor as a graph output (minimum
  of interleaved runs, all optimizations, 1 thread), and session creation time of each;
- from onnxruntime's profiler, per-run time of the ReorderOutput nodes (NCHWc -> NCHW copies) and
  the Conv / Add node counts of each optimized graph (fusions stop at graph outputs);
- the parts of one statistics pass (collect): session creation, runs, numpy statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt import calibration, validate  # noqa: E402
from onnxopt.data import load_feeds, model_inputs  # noqa: E402
from onnxopt.passes.base import PassContext  # noqa: E402
from onnxopt.passes.quantize import QuantizePass  # noqa: E402


def session(data: bytes, outputs: list[str], profile: str | None = None, optimized: str | None = None):
    model = onnx.load_from_string(data)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    if optimized:
        options.optimized_model_filepath = optimized
    t = time.perf_counter()
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s, [o.name for o in s.get_outputs()], time.perf_counter() - t


def node_profile(data: bytes, outputs: list[str], feed: dict, folder: Path, label: str, runs: int = 30):
    """(ReorderOutput ms per run, Conv nodes, Add nodes) of the optimized session graph."""
    optimized = str(folder / f"{label}.onnx")
    s, names, _ = session(data, outputs, profile=str(folder / label), optimized=optimized)
    for _ in range(runs):
        s.run(names, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    reorder = sum(e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                  and e["args"].get("op_name") == "ReorderOutput") / runs / 1e3
    ops = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    return reorder, ops["Conv"], ops["Add"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "ppocr_cls")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    calib = load_feeds(args.model / "calib.npz")
    request = QuantizePass(None, PassContext(calib=calib)).calibration_request(onnx.load(args.model / "model.onnx"))
    model = request.model
    inputs = {v.name for v in model_inputs(model)}
    fetched = [n for n in dict.fromkeys([*request.tensors, *request.mean_axes]) if n not in inputs]
    with calibration.Session(model, extra_outputs=fetched, optimize=True) as s:
        batch = next(validate.joined_runs(s, model, calib, fetched, 0))[0]
    feed = next(calib.batches(batch))
    data = model.SerializeToString()

    plain, plain_names, plain_setup = session(data, [])
    full, full_names, full_setup = session(data, fetched)
    times: dict[str, list[float]] = {"plain": [], "observed": []}
    for _ in range(args.runs):
        for label, (sess, names) in {"plain": (plain, plain_names), "observed": (full, full_names)}.items():
            t = time.perf_counter()
            sess.run(names, feed)
            times[label].append(time.perf_counter() - t)
    fetched_mib = sum(v.nbytes for v in full.run(fetched, feed)) / 2**20
    run_ms = {label: min(t) * 1e3 for label, t in times.items()}
    print(f"{args.model.name}: {len(fetched)} observed tensors, batches of {batch}, {fetched_mib:.1f} MiB fetched a batch")
    print(f"run per batch: plain {run_ms['plain']:.2f} ms, observed {run_ms['observed']:.2f} ms "
          f"({run_ms['observed'] / run_ms['plain']:.2f}x); session creation {plain_setup * 1e3:.1f} / "
          f"{full_setup * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        for label, outputs in (("plain", []), ("observed", fetched)):
            reorder, convs, adds = node_profile(data, outputs, feed, Path(tmp), label)
            print(f"{label:>8} graph: ReorderOutput {reorder:.2f} ms a run, {convs} Conv, {adds} Add nodes")

    parts = {"session": 0.0, "runs": 0.0, "statistics": 0.0}
    real_init, real_run, real_update = calibration.Session.__init__, calibration.Session.run, calibration.TensorStats.update

    def timed(part, f):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                parts[part] += time.perf_counter() - t
        return wrapper

    calibration.Session.__init__ = timed("session", real_init)
    calibration.Session.run = timed("runs", real_run)
    calibration.TensorStats.update = timed("statistics", real_update)
    try:
        t = time.perf_counter()
        calibration.collect(model, calib, request.tensors, histogram_bins=request.histogram_bins,
                            mean_axes=request.mean_axes)
        total = time.perf_counter() - t
    finally:
        calibration.Session.__init__, calibration.Session.run = real_init, real_run
        calibration.TensorStats.update = real_update
    print(f"statistics pass over {len(calib)} samples: {total * 1e3:.1f} ms = " +
          ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()) +
          f", other {(total - sum(parts.values())) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
