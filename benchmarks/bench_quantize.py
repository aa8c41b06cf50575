"""Static int8 quantization side by side: onnxopt quantize vs onnxruntime quantize_static vs onnxsim.

    python benchmarks/bench_quantize.py [--models ../shared/models] [--samples samples] [--runs 200]

Per model: task accuracy (or cosine to fp32 without labels) on the eval data, file size, onnxruntime
latency (all graph optimizations, 1 thread, batch 1,
lower quartile of --runs) relative to fp32, calibration wall time.
Then onnxopt's calibration peak RSS and wall time at 16, 64 and 256 samples, each in a fresh child
process (samples repeat the calibration set cyclically), against one plain fp32 inference pass.
Prints markdown tables and writes benchmarks/out/bench_quantize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.data import FeedSet, load_feeds  # noqa: E402
from onnxopt.passes.base import PassContext  # noqa: E402
from onnxopt.passes.quantize import QuantizePass  # noqa: E402


def cases(models: Path, samples: Path):
    """(name, model path, calib, eval, labels or None) for every model with data."""
    for folder in sorted(p for p in models.iterdir() if (p / "model.onnx").exists()):
        labels = folder / "labels.npz"
        yield folder.name, folder / "model.onnx", folder / "calib.npz", folder / "eval.npz", labels
    for model in sorted(samples.glob("*.onnx")):
        stem = model.with_suffix("")
        labels = Path(f"{stem}.labels.npz")
        yield f"samples/{model.stem}", model, Path(f"{stem}.calib.npz"), Path(f"{stem}.eval.npz"), labels


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, feeds: FeedSet) -> list[np.ndarray]:
    s = session(path, optimize=True)
    return [s.run(None, {k: np.asarray(v) for k, v in f.items()})[0] for f in feeds]


def latency_ms(path: Path, feed: dict, runs: int) -> float:
    s = session(path, optimize=True)
    for _ in range(10):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 25) * 1e3)  # lower quartile: robust to a busy shared machine


def score(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> dict:
    r = np.concatenate([x.ravel() for x in ref]).astype(np.float64)
    c = np.concatenate([x.ravel() for x in out]).astype(np.float64)
    result = {"cosine": float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c)))}
    if labels is not None:
        result["accuracy"] = float(np.mean([o.reshape(-1).argmax() == y for o, y in zip(out, labels)]))
    return result


# --------------------------------------------------------------------------- quantizers


def ours(model_path: Path, calib: FeedSet, out: Path, **options) -> dict:
    model = onnx.load(model_path)
    result = QuantizePass(QuantizePass.Options(**options), PassContext(calib=calib))(model)
    onnx.save(result.model, out)
    return {k: v for k, v in result.stats.items() if not k.startswith("kept_float:")}


def ort_static(method: str):
    def quantize(model_path: Path, calib: FeedSet, out: Path) -> dict:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib)

            def get_next(self):
                feed = next(self.it, None)
                return None if feed is None else {k: np.asarray(v) for k, v in feed.items()}

        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            source = onnx.load(model_path)
            if source.opset_import[0].version < 13:
                source = onnx.version_converter.convert_version(source, 13)
            onnx.save(source, Path(tmp) / "in.onnx")
            quant_pre_process(str(Path(tmp) / "in.onnx"), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method))
        return {}

    return quantize


def onnxsim_static(model_path: Path, calib: FeedSet, out: Path) -> dict:
    import onnxsim

    data = [{k: np.asarray(v) for k, v in f.items()} for f in calib]
    onnx.save(onnxsim.quantize_static(onnx.load(model_path), calibration_data=data, method="minmax"), out)
    return {}


QUANTIZERS = {
    "onnxopt (default: mse)": lambda p, c, o: ours(p, c, o),
    "onnxopt minmax": lambda p, c, o: ours(p, c, o, method="minmax"),
    "onnxopt min_cosine=0.999": lambda p, c, o: ours(p, c, o, min_cosine=0.999),
    "ort MinMax": ort_static("MinMax"),
    "ort Percentile": ort_static("Percentile"),
    "ort Entropy": ort_static("Entropy"),
    "onnxsim minmax": onnxsim_static,
}


# --------------------------------------------------------------------------- calibration memory


def child(model_path: str, calib_path: str, count: int) -> None:
    """One calibration in this fresh process: wall time, peak RSS, and one plain fp32 pass for scale."""
    base = load_feeds(calib_path)
    reps = -(-count // len(base))
    feeds = FeedSet({k: np.concatenate([v] * reps)[:count] for k, v in base.arrays.items()}, "calib")
    model = onnx.load(model_path)
    s = session(Path(model_path), optimize=False)
    t = time.perf_counter()
    for f in feeds:
        s.run(None, f)
    plain = time.perf_counter() - t
    del s
    rss_before = peak_rss_mb()
    t = time.perf_counter()
    QuantizePass(None, PassContext(calib=feeds))(model)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "fp32_pass_s": plain, "peak_rss_mb": peak_rss_mb(),
                      "rss_before_mb": rss_before}))


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM: reset at exec, unlike ru_maxrss which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calib_scaling(model_path: Path, calib_path: Path) -> dict:
    rows = {}
    for n in (16, 64, 256):
        done = subprocess.run([sys.executable, __file__, "--child", str(model_path), str(calib_path), str(n)],
                              capture_output=True, text=True, check=True)
        rows[n] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def calib_pass_time(model_path: Path, calib: FeedSet) -> float:
    """Calibration time (statistics only) vs one plain fp32 inference pass over the same samples."""
    from onnxopt.calibration import collect
    from onnxopt.passes.quantize import _plan

    model = onnx.load(model_path)
    if model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    plan = _plan(model.graph, QuantizePass.Options(), set(), {})
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "m.onnx")
        s = session(Path(tmp) / "m.onnx", optimize=False)
        t = time.perf_counter()
        for f in calib:
            s.run(None, {k: np.asarray(v) for k, v in f.items()})
        plain = time.perf_counter() - t
    t = time.perf_counter()
    collect(model, calib, sorted(set(plan.acts.values())), histogram_bins=2048,
            sumsq_axes={u.activations[0]: u.channel_axis for u in plan.units if u.channel_axis is not None})
    return (time.perf_counter() - t) / plain


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    results: dict = {}
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_path, calib_path, eval_path, labels_path in cases(args.models, args.samples):
            calib, evals = load_feeds(calib_path), load_feeds(eval_path)
            labels = np.load(labels_path)["labels"] if labels_path.exists() else None
            ref = outputs(model_path, evals)
            feed0 = {k: np.asarray(v) for k, v in next(iter(evals)).items()}
            fp32_ms = latency_ms(model_path, feed0, args.runs)
            rows = {"fp32": {"size_kb": model_path.stat().st_size / 1024, "latency_ms": fp32_ms,
                             **score(ref, ref, labels)}}
            for qname, quantize in QUANTIZERS.items():
                out = Path(tmp) / f"{name.replace('/', '_')}_{qname.replace(' ', '_')}.onnx"
                t = time.perf_counter()
                try:
                    stats = quantize(model_path, calib, out)
                except Exception as exc:  # a peer failing is a result, not a crash
                    rows[qname] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
                    continue
                wall = time.perf_counter() - t
                ms = latency_ms(out, feed0, args.runs)
                rows[qname] = {"size_kb": out.stat().st_size / 1024, "latency_ms": ms, "quantize_s": wall,
                               **score(ref, outputs(out, evals), labels), "stats": stats}
            results[name] = {"rows": rows, "calib": calib_scaling(model_path, calib_path),
                             "calib_vs_fp32_pass": calib_pass_time(model_path, calib)}
            print_model(name, results[name], labels is not None)
    (out_dir / "bench_quantize.json").write_text(json.dumps(results, indent=1, default=float))


def print_model(name: str, result: dict, has_labels: bool) -> None:
    rows = result["rows"]
    fp32 = rows["fp32"]
    print(f"\n### {name}\n")
    print("| quantizer | " + ("accuracy | " if has_labels else "") +
          "cosine to fp32 | size KiB (x fp32) | latency ms (x fp32) | quantize s |")
    print("|---|" + ("---|" if has_labels else "") + "---|---|---|---|")
    for qname, r in rows.items():
        if "error" in r:
            print(f"| {qname} | failed: {r['error']} |")
            continue
        acc = f"{r['accuracy'] * 100:.1f}% | " if has_labels else ""
        print(f"| {qname} | {acc}{r['cosine']:.5f} | {r['size_kb']:.0f} ({r['size_kb'] / fp32['size_kb']:.2f}) | "
              f"{r['latency_ms']:.3f} ({r['latency_ms'] / fp32['latency_ms']:.2f}) | {r.get('quantize_s', 0):.2f} |")
    print("\nonnxopt calibration (default options, fresh process per size):\n")
    print("| samples | quantize wall s | fp32 pass s | peak RSS MiB | peak RSS before quantize MiB |")
    print("|---|---|---|---|---|")
    for n, c in result["calib"].items():
        print(f"| {n} | {c['wall_s']:.2f} | {c['fp32_pass_s']:.2f} | {c['peak_rss_mb']:.0f} | {c['rss_before_mb']:.0f} |")
    print(f"\nstatistics pass (histograms + channel sums) / plain fp32 pass: {result['calib_vs_fp32_pass']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
