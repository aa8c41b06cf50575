"""int8 quantization side by side: onnxopt quantize (auto, static, dynamic) vs onnxruntime quantize_dynamic,
quantize_static and onnxsim, on the shared models and the samples.

    python benchmarks/bench_quantize.py [--models ../shared/models] [--samples samples] [--runs 300]
                                        [--only minilm_l3,samples/transformer] [--no-calibration-costs]

Per model: task accuracy (or cosine to fp32 without labels) on the eval data; for sentence encoders
(minilm_l3: a masked mean over eval.lengths.npz tokens, as its info.json says; samples/transformer: the
mean over all tokens) the cosine of each sentence embedding to fp32's, mean and worst over the eval
sentences; file size, onnxruntime latency relative to fp32 (all graph optimizations, 1 thread, batch 1;
the candidates take turns in blocks of 10 warm runs, each round starting at the next, until each has --runs
counted runs; median per candidate, so load on a shared machine hits all alike), quantize wall time.
Calibration time: onnxopt's statistics pass (collect, default options, session creation included)
against a plain fp32 pass over the same samples as a user would run it (onnxruntime session with all
optimizations, 1 thread, created and run over the samples in the same joined batches as calibration),
median of interleaved repeats. Calibration memory: quantize with 16, 64 and 256 samples (calibration
set repeated, in an uncompressed .npz that the child reads rows of as calibration runs), each in a
fresh child process: total peak RSS, and the growth during quantize (peak minus RSS just before it).
Prints markdown tables and writes benchmarks/out/bench_quantize.json.
"""

from __future__ import annotations

import argparse
import json
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

from common import cases, score, session  # noqa: E402
from onnxopt.data import FeedSet, load_feeds  # noqa: E402
from onnxopt.passes.base import PassContext  # noqa: E402
from onnxopt.passes.quantize import AUTO_LATENCY_BLOCK as BLOCK  # noqa: E402
from onnxopt.passes.quantize import QuantizePass  # noqa: E402


def outputs(path: Path, feeds: FeedSet) -> list[np.ndarray]:
    s = session(path, optimize=True)
    return [s.run(None, {k: np.asarray(v) for k, v in f.items()})[0] for f in feeds]


def latencies_ms(paths: dict[str, Path], feed: dict, runs: int, threads: int = 1) -> dict[str, float]:
    """Median latency per model, warm, as quantize's auto mode measures it: the models take turns in blocks of
    BLOCK runs (the first of a block not counted: it finds the caches the other models used), each round
    starting at the next model, until every model has ``runs`` counted runs (``threads``: intra-op)."""
    sessions = {name: session(path, optimize=True, threads=threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(-(-runs // (BLOCK - 1))):
        for name in names[r % len(names):] + names[:r % len(names)]:
            s = sessions[name]
            s.run(None, feed)
            for _ in range(BLOCK - 1):
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


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


def ort_dynamic(model_path: Path, calib: FeedSet, out: Path) -> dict:
    """onnxruntime's dynamic int8 quantizer as a user runs it (per-channel int8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model_path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return {}


QUANTIZERS = {
    "onnxopt (default: auto)": lambda p, c, o: ours(p, c, o),
    "onnxopt static (mse)": lambda p, c, o: ours(p, c, o, mode="static"),
    "onnxopt dynamic": lambda p, c, o: ours(p, c, o, mode="dynamic"),
    "onnxopt dynamic embeddings=int8_block128": lambda p, c, o: ours(p, c, o, mode="dynamic",
                                                                     embeddings="int8_block128"),
    "onnxopt dynamic smooth_mul=false": lambda p, c, o: ours(p, c, o, mode="dynamic", smooth_mul=False),
    "onnxopt static min_cosine=0.999": lambda p, c, o: ours(p, c, o, mode="static", min_cosine=0.999),
    "ort quantize_dynamic": ort_dynamic,
    "ort MinMax": ort_static("MinMax"),
    "ort Percentile": ort_static("Percentile"),
    "ort Entropy": ort_static("Entropy"),
    "onnxsim minmax": onnxsim_static,
}


# --------------------------------------------------------------------------- calibration memory


def child(model_path: str, calib_path: str) -> None:
    """One quantize in this fresh process: wall time, total peak RSS and its growth during quantize."""
    feeds = load_feeds(calib_path)  # rows are read from the file as calibration needs them
    model = onnx.load(model_path)
    rss_before = proc_status_mb("VmRSS")
    t = time.perf_counter()
    QuantizePass(None, PassContext(calib=feeds))(model)
    wall = time.perf_counter() - t
    peak = proc_status_mb("VmHWM")
    print(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": rss_before,
                      "growth_mb": peak - rss_before}))


def proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (high-water mark, reset at exec) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def calib_scaling(model_path: Path, calib_path: Path) -> dict:
    """Quantize with 16, 64 and 256 samples (the calibration set repeated, written as an uncompressed
    .npz as np.savez does), each in a fresh process."""
    base = load_feeds(calib_path)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (16, 64, 256):
            data = Path(tmp) / f"calib{n}.npz"
            np.savez(data, **{k: np.resize(np.asarray(v), (n, *v.shape[1:])) for k, v in base.arrays.items()})
            done = subprocess.run([sys.executable, __file__, "--child", str(model_path), str(data)],
                                  capture_output=True, text=True, check=True)
            rows[n] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def calib_pass_time(model_path: Path, calib: FeedSet, repeats: int = 7) -> dict:
    """Statistics pass (as quantize runs it) vs a plain fp32 pass over the same samples, same batches."""
    from onnxopt.calibration import collect
    from onnxopt.validate import joined_runs as _runs
    from onnxopt.data import model_inputs
    from onnxopt.validate import Session

    request = QuantizePass(None, PassContext(calib=calib)).calibration_request(onnx.load(model_path))
    model = request.model
    inputs = {v.name for v in model_inputs(model)}
    fetched = [n for n in dict.fromkeys([*request.tensors, *request.mean_axes]) if n not in inputs]
    with Session(model, extra_outputs=fetched, optimize=True) as s:
        batch = next(_runs(s, model, calib, fetched, 0))[0]  # the batch size calibration chooses
    data = model.SerializeToString()

    def plain(size: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        s = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        for feed in calib.batches(size):
            s.run(None, feed)

    def stats() -> None:
        collect(model, calib, request.tensors, histogram_bins=request.histogram_bins, mean_axes=request.mean_axes)

    runs = {"plain": lambda: plain(batch), "per_sample": lambda: plain(1), "calib": stats}
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    plain_s, per_sample_s, calib_s = (float(np.median(times[k])) for k in runs)
    return {"batch": batch, "samples": len(calib), "plain_s": plain_s, "per_sample_s": per_sample_s,
            "calib_s": calib_s, "ratio": calib_s / plain_s, "ratio_per_sample": calib_s / per_sample_s}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--runs", type=int, default=300, help="latency rounds (one run per candidate each)")
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--no-calibration-costs", action="store_true",
                        help="skip the calibration memory and statistics-pass timings")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1])
        return
    results: dict = {}
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        only = args.only.split(",") if args.only else None
        for name, model_path, calib_path, eval_path, labels in cases(args.models, args.samples, only):
            calib, evals = load_feeds(calib_path), load_feeds(eval_path)
            ref = outputs(model_path, evals)
            feed0 = {k: np.asarray(v) for k, v in next(iter(evals)).items()}
            sentences = sentence_lengths(name, eval_path, len(ref))

            def scored(output: list[np.ndarray]) -> dict:
                result = score(ref, output, labels)
                if sentences is not None:
                    cos = sentence_cosines(ref, output, sentences)
                    result.update(sentence_mean=float(cos.mean()), sentence_worst=float(cos.min()))
                return result

            rows = {"fp32": {"size_kb": model_path.stat().st_size / 1024, **scored(ref)}}
            paths = {"fp32": model_path}
            for qname, quantize in QUANTIZERS.items():
                out = Path(tmp) / f"{name.replace('/', '_')}_{qname.replace(' ', '_')}.onnx"
                t = time.perf_counter()
                try:
                    stats = quantize(model_path, calib, out)
                except Exception as exc:  # a peer failing is a result, not a crash
                    rows[qname] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
                    continue
                wall = time.perf_counter() - t
                rows[qname] = {"size_kb": out.stat().st_size / 1024, "quantize_s": wall,
                               **scored(outputs(out, evals)), "stats": stats}
                paths[qname] = out
            for qname, ms in latencies_ms(paths, feed0, args.runs).items():
                rows[qname]["latency_ms"] = ms
            results[name] = {"rows": rows}
            if not args.no_calibration_costs:
                results[name].update(calib=calib_scaling(model_path, calib_path),
                                     calib_vs_fp32_pass=calib_pass_time(model_path, calib))
            print_model(name, results[name], labels is not None)
    (out_dir / "bench_quantize.json").write_text(json.dumps(results, indent=1, default=float))


def sentence_lengths(name: str, eval_path: Path, samples: int) -> np.ndarray | None:
    """Real tokens per eval sentence for the sentence encoders (None: not a sentence model)."""
    lengths = eval_path.with_name("eval.lengths.npz")
    if lengths.exists():
        with np.load(lengths) as npz:
            return npz[npz.files[0]].astype(int)
    return np.full(samples, -1) if name == "samples/transformer" else None  # -1: every token


def sentence_cosines(reference: list, output: list, lengths: np.ndarray) -> np.ndarray:
    """Per sentence: cosine of the masked-mean embedding (first ``length`` tokens; -1: all) to fp32's."""
    def embed(hidden: np.ndarray, length: int) -> np.ndarray:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        return tokens[: length if length > 0 else None].mean(axis=0, dtype=np.float64)

    cos = []
    for r, o, n in zip(reference, output, lengths):
        a, b = embed(r, n), embed(o, n)
        cos.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return np.array(cos)


def auto_choice(stats: dict) -> str:
    """Which candidate quantize's auto mode kept, from its stats."""
    if stats.get("mode_dynamic"):
        muls = stats.get("smoothing_mul", 0)
        return f"dynamic, {muls} migration Muls" + (f" ({stats['smoothing_mul_dropped']} dropped)"
                                                   if stats.get("smoothing_mul_dropped") else "")
    return "static, narrow Convs float" if stats.get("narrow_convs_float") else "static"


def print_model(name: str, result: dict, has_labels: bool) -> None:
    rows = result["rows"]
    fp32 = rows["fp32"]
    sentences = "sentence_mean" in fp32
    print(f"\n### {name}\n")
    print("| quantizer | " + ("accuracy | " if has_labels else "") +
          ("sentence cosine mean / worst | " if sentences else "") +
          "cosine to fp32 | size KiB (x fp32) | median latency ms, warm, interleaved, 1 thread (x fp32) | quantize s |")
    print("|---|" + ("---|" if has_labels else "") + ("---|" if sentences else "") + "---|---|---|---|")
    for qname, r in rows.items():
        if "error" in r:
            print(f"| {qname} | failed: {r['error']} |")
            continue
        acc = f"{r['accuracy'] * 100:.1f}% | " if has_labels else ""
        sent = f"{r['sentence_mean']:.4f} / {r['sentence_worst']:.4f} | " if sentences else ""
        chosen = r.get("stats", {}).get("mode_dynamic")
        label = qname if chosen is None else f"{qname}: {auto_choice(r['stats'])}"
        print(f"| {label} | {acc}{sent}{r['cosine']:.5f} | {r['size_kb']:.0f} ({r['size_kb'] / fp32['size_kb']:.2f}) | "
              f"{r['latency_ms']:.3f} ({r['latency_ms'] / fp32['latency_ms']:.2f}) | {r.get('quantize_s', 0):.2f} |")
    if "calib" not in result:
        sys.stdout.flush()
        return
    print("\nonnxopt quantize memory (default options, fresh process per size; growth = peak - RSS just before "
          "quantize; the data is read from an uncompressed .npz as runs need it):\n")
    print("| samples | quantize wall s | RSS before MiB | total peak RSS MiB | growth during quantize MiB |")
    print("|---|---|---|---|---|")
    for n, c in result["calib"].items():
        print(f"| {n} | {c['wall_s']:.2f} | {c['rss_before_mb']:.0f} | {c['peak_rss_mb']:.0f} | {c['growth_mb']:.1f} |")
    t = result["calib_vs_fp32_pass"]
    print(f"\nstatistics pass (default method, {t['samples']} samples in joined batches of {t['batch']}, session "
          f"creation included) {t['calib_s'] * 1e3:.1f} ms / plain fp32 pass (ORT_ENABLE_ALL, 1 thread, same batches, "
          f"session creation included) {t['plain_s'] * 1e3:.1f} ms = {t['ratio']:.2f}x; / plain fp32 pass one "
          f"sample a run (as the sample-major data is defined) {t['per_sample_s'] * 1e3:.1f} ms = "
          f"{t['ratio_per_sample']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
