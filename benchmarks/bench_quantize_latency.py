"""int8 latency against onnxruntime's own int8 models of the same network, few sessions at a time: onnxopt
quantize (auto, static, dynamic) against onnxruntime's quantize_dynamic and quantize_static (QDQ, per channel,
MinMax / Percentile / Entropy) and fp32.

    python benchmarks/bench_quantize_latency.py [--models ../shared/models] [--only a,b] [--runs 300] [--repeats 5]

Issue 9's latency target compares onnxopt's default with the fastest of onnxruntime's int8 models *that keep
accuracy*: so every model is scored on the eval data first (labelled models: accuracy within 0.5 point of fp32;
the sentence encoders: sentence cosine mean >= 0.998 and worst >= 0.995, as bench_quantize.py measures them).
Latency: onnxruntime CPU, 1 thread (intra and inter op), all graph optimizations, batch 1, one eval sample; the
sessions take turns in blocks of 10 runs (the first of each block, which finds the caches the others used, not
counted; each round starts at the next model) until each has --runs counted runs, repeated --repeats times; the
median of the per-repeat medians is reported, so that load from other processes hits every model alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quantize import (auto_choice, latencies_ms, ort_dynamic, ort_static, ours, outputs,  # noqa: E402
                            sentence_cosines, sentence_lengths)
from common import cases, score  # noqa: E402
from onnxopt.data import load_feeds  # noqa: E402

DEFAULT = "onnxopt (default: auto)"
OURS = {
    DEFAULT: lambda p, c, o: ours(p, c, o),
    "onnxopt static": lambda p, c, o: ours(p, c, o, mode="static"),
    "onnxopt dynamic": lambda p, c, o: ours(p, c, o, mode="dynamic"),
}
PEERS = {
    "ort quantize_dynamic": ort_dynamic,
    "ort static MinMax": ort_static("MinMax"),
    "ort static Percentile": ort_static("Percentile"),
    "ort static Entropy": ort_static("Entropy"),
}


def keeps_accuracy(result: dict, reference: dict) -> bool:
    """Issue 9's bars: accuracy within 0.5 point of fp32; sentence cosine mean >= 0.998, worst >= 0.995."""
    if "accuracy" in result:
        return result["accuracy"] >= reference["accuracy"] - 0.005
    if "sentence_mean" in result:
        return result["sentence_mean"] >= 0.998 and result["sentence_worst"] >= 0.995
    return result["cosine"] >= 0.999


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    qualities = []
    print("| model | " + " | ".join(["fp32", *OURS, *PEERS]) + " | auto chose | fastest accurate ort | "
          "default × that |")
    print("|---|" + "---|" * (len(OURS) + len(PEERS) + 4))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_path, calib_path, eval_path, labels in cases(args.models, args.samples, only):
            calib, evals = load_feeds(calib_path), load_feeds(eval_path)
            ref = outputs(model_path, evals)
            sentences = sentence_lengths(name, eval_path, len(ref))

            def scored(path: Path) -> dict:
                output = outputs(path, evals)
                result = score(ref, output, labels)
                if sentences is not None:
                    cos = sentence_cosines(ref, output, sentences)
                    result.update(sentence_mean=float(cos.mean()), sentence_worst=float(cos.min()))
                return result

            paths, chosen = {"fp32": model_path}, "?"
            for qname, quantize in {**OURS, **PEERS}.items():
                out = Path(tmp) / f"{name.replace('/', '_')}_{len(paths)}.onnx"
                stats = quantize(model_path, calib, out)
                paths[qname] = out
                if qname == DEFAULT:
                    chosen = auto_choice(stats)
            quality = {k: scored(p) for k, p in paths.items()}
            feed = {k: np.asarray(v) for k, v in next(iter(evals)).items()}
            repeats = [latencies_ms(paths, feed, args.runs) for _ in range(args.repeats)]
            ms = {k: float(np.median([r[k] for r in repeats])) for k in paths}
            accurate = [k for k in PEERS if keeps_accuracy(quality[k], quality["fp32"])]
            peer = min(accurate, key=ms.get) if accurate else None
            sizes = {k: p.stat().st_size / model_path.stat().st_size for k, p in paths.items()}

            def cell(k: str) -> str:
                mark = "" if keeps_accuracy(quality[k], quality["fp32"]) else " ✗"
                return f"{ms[k]:.3f} ({ms[k] / ms['fp32']:.2f}, {sizes[k]:.2f}×){mark}"

            ratio = f"{ms[DEFAULT] / ms[peer]:.2f}" if peer else "—"
            print(f"| {name} | " + " | ".join(cell(k) for k in paths) + f" | {chosen} | {peer or 'none'} | "
                  f"{ratio} |")
            sys.stdout.flush()
            qualities.append((name, quality))
    print("\nAccuracy on the eval data (labelled: top-1; sentence encoders: sentence cosine mean / worst):\n")
    print("| model | " + " | ".join([*OURS, *PEERS]) + " |")
    print("|---|" + "---|" * (len(OURS) + len(PEERS)))
    for name, quality in qualities:
        print(f"| {name} | " + " | ".join(describe(quality[k]) for k in [*OURS, *PEERS]) + " |")


def describe(result: dict) -> str:
    if "accuracy" in result:
        return f"{result['accuracy'] * 100:.1f}%"
    if "sentence_mean" in result:
        return f"{result['sentence_mean']:.4f} / {result['sentence_worst']:.4f}"
    return f"cos {result['cosine']:.5f}"


if __name__ == "__main__":
    main()
