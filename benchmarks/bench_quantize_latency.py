"""int8 latency side by side, few sessions at a time: onnxopt quantize (auto, static, dynamic, dynamic without
migration Muls) against onnxruntime's quantize_dynamic and quantize_static (MinMax) and fp32.

    python benchmarks/bench_quantize_latency.py [--models ../shared/models] [--only a,b] [--runs 300] [--repeats 3]

bench_quantize.py times a dozen sessions round-robin, which on a loaded 2-core machine thrashes the caches of
the larger models; here only these seven are interleaved (1 thread, all graph optimizations, batch 1), the
round-robin is repeated and the median of the per-repeat medians is reported, with each model's latency
relative to onnxruntime's dynamic and static int8 models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quantize import latencies_ms, ort_dynamic, ort_static, ours  # noqa: E402
from common import cases  # noqa: E402
from onnxopt.data import load_feeds  # noqa: E402

CANDIDATES = {
    "onnxopt (default: auto)": lambda p, c, o: ours(p, c, o),
    "onnxopt static": lambda p, c, o: ours(p, c, o, mode="static"),
    "onnxopt dynamic": lambda p, c, o: ours(p, c, o, mode="dynamic"),
    "onnxopt dynamic smooth_mul=false": lambda p, c, o: ours(p, c, o, mode="dynamic", smooth_mul=False),
    "ort quantize_dynamic": ort_dynamic,
    "ort quantize_static MinMax": ort_static("MinMax"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    print("| model | " + " | ".join(["fp32", *CANDIDATES]) + " | auto chose |")
    print("|---|" + "---|" * (len(CANDIDATES) + 2))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_path, calib_path, eval_path, _ in cases(args.models, args.samples, only):
            calib = load_feeds(calib_path)
            paths, chosen = {"fp32": model_path}, "static"
            for qname, quantize in CANDIDATES.items():
                out = Path(tmp) / f"{name.replace('/', '_')}_{len(paths)}.onnx"
                stats = quantize(model_path, calib, out)
                paths[qname] = out
                if "mode_dynamic" in stats and qname.startswith("onnxopt (default"):
                    chosen = "dynamic" if stats["mode_dynamic"] else "static"
            feed = {k: np.asarray(v) for k, v in next(iter(load_feeds(eval_path))).items()}
            repeats = [latencies_ms(paths, feed, args.runs) for _ in range(args.repeats)]
            ms = {k: float(np.median([r[k] for r in repeats])) for k in paths}
            dyn, static = ms["ort quantize_dynamic"], ms["ort quantize_static MinMax"]
            cells = [f"{ms[k]:.3f} ({ms[k] / dyn:.2f} / {ms[k] / static:.2f})" for k in paths]
            print(f"| {name} | " + " | ".join(cells) + f" | {chosen} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
