"""int8 latency against onnxruntime's own int8 models of the same network, few sessions at a time: onnxopt
quantize (auto, static, dynamic) against onnxruntime's quantize_dynamic and quantize_static (QDQ, per channel,
MinMax / Percentile / Entropy) and fp32.

    python benchmarks/bench_quantize_latency.py [--models ../shared/models] [--only a,b] [--runs 300] [--repeats 5]
                                                [--threads 1,2] [--quantizers "onnxopt (default: auto),ort quantize_dynamic"]
                                                [--profile benchmarks/out/profiles]

Issue 9's latency target compares onnxopt's default with the fastest of onnxruntime's int8 models *that keep
accuracy*: so every model is scored on the eval data first (labelled models: accuracy within 0.5 point of fp32;
the sentence encoders: sentence cosine mean >= 0.998 and worst >= 0.995, as bench_quantize.py measures them).
Latency: onnxruntime CPU, 1 thread (intra op; ``--threads 1,2`` measures each count, alternating repeat by
repeat), all graph optimizations, batch 1, one eval sample; the
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
from common import cases, score, session  # noqa: E402
from onnxopt.data import load_feeds  # noqa: E402

DEFAULT = "onnxopt (default: auto)"
OURS = {
    DEFAULT: lambda p, c, o: ours(p, c, o),
    "onnxopt static": lambda p, c, o: ours(p, c, o, mode="static"),
    "onnxopt dynamic": lambda p, c, o: ours(p, c, o, mode="dynamic"),
    "onnxopt dynamic smooth_mul=false": lambda p, c, o: ours(p, c, o, mode="dynamic", smooth_mul=False),
}
DYNAMIC = "ort quantize_dynamic"  # issue 9's latency peer for transformers, accurate or not
PEERS = {
    DYNAMIC: ort_dynamic,
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
    parser.add_argument("--quantizers", help=f"comma-separated, of: {', '.join([*OURS, *PEERS])} (default: all)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1", help="comma-separated intra-op thread counts, each measured "
                        "with every model, the counts alternating repeat by repeat (e.g. 1,2)")
    parser.add_argument("--profile", type=Path, help="also run onnxruntime's profiler (1 thread, --runs runs) on "
                        "each model and print the time per operator type; its JSON files go to this folder")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    chosen_names = args.quantizers.split(",") if args.quantizers else [*OURS, *PEERS]
    unknown = set(chosen_names) - {*OURS, *PEERS}
    if unknown:
        parser.error(f"unknown quantizers: {', '.join(sorted(unknown))}")
    ours_now = {k: v for k, v in OURS.items() if k in chosen_names}
    peers_now = {k: v for k, v in PEERS.items() if k in chosen_names}
    threads = [int(t) for t in args.threads.split(",")]
    qualities, tables = [], {t: [] for t in threads}
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
            for qname, quantize in {**ours_now, **peers_now}.items():
                out = Path(tmp) / f"{name.replace('/', '_')}_{len(paths)}.onnx"
                stats = quantize(model_path, calib, out)
                paths[qname] = out
                if qname == DEFAULT:
                    chosen = auto_choice(stats)
            quality = {k: scored(p) for k, p in paths.items()}
            feed = {k: np.asarray(v) for k, v in next(iter(evals)).items()}
            repeats = {t: [] for t in threads}
            for _ in range(args.repeats):  # thread counts alternate, so load swings hit both
                for t in threads:
                    repeats[t].append(latencies_ms(paths, feed, args.runs, t))
            accurate = [k for k in peers_now if keeps_accuracy(quality[k], quality["fp32"])]
            sizes = {k: p.stat().st_size / model_path.stat().st_size for k, p in paths.items()}
            for t in threads:
                tables[t].append(row(name, paths, repeats[t], sizes, quality, accurate, chosen))
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                print(f"\nonnxruntime profile, {name}, 1 thread, {args.runs} runs: ms per run by operator type\n")
                print(profile_table(paths, feed, args.runs, args.profile / name.replace("/", "_")))
            qualities.append((name, quality))
    columns = ["fp32", *ours_now, *peers_now]
    for t in threads:
        print(f"\nLatency, intra_op_num_threads={t}: ms, median of the {args.repeats} repeats' medians [their min - "
              "max] (× fp32, file × fp32; ✗: loses accuracy); default × the fastest accurate ort peer, and × "
              "quantize_dynamic's model: the median of the paired per-repeat ratios [min - max]\n")
        print("| model | " + " | ".join(columns) + " | auto chose | fastest accurate ort | default × that | "
              "default × ort quantize_dynamic |")
        print("|---|" + "---|" * (len(columns) + 4))
        print("\n".join(tables[t]))
    print("\nAccuracy on the eval data (labelled: top-1; sentence encoders: sentence cosine mean / worst):\n")
    print("| model | " + " | ".join(columns[1:]) + " |")
    print("|---|" + "---|" * (len(columns) - 1))
    for name, quality in qualities:
        print(f"| {name} | " + " | ".join(describe(quality[k]) for k in columns[1:]) + " |")


def row(name: str, paths: dict, repeats: list[dict], sizes: dict, quality: dict, accurate: list[str],
        chosen: str) -> str:
    """One table row: each model's median latency with the spread of the repeats, and the paired ratio."""
    ms = {k: float(np.median([r[k] for r in repeats])) for k in paths}
    peer = min(accurate, key=ms.get) if accurate else None

    def cell(k: str) -> str:
        mark = "" if keeps_accuracy(quality[k], quality["fp32"]) else " ✗"
        low, high = min(r[k] for r in repeats), max(r[k] for r in repeats)
        return f"{ms[k]:.3f} [{low:.3f} - {high:.3f}] ({ms[k] / ms['fp32']:.2f}, {sizes[k]:.3f}×){mark}"

    def paired(other: str | None) -> str:
        if other not in paths or DEFAULT not in paths:
            return "—"
        ratios = [r[DEFAULT] / r[other] for r in repeats]
        return f"{np.median(ratios):.3f} [{min(ratios):.3f} - {max(ratios):.3f}]"

    return (f"| {name} | " + " | ".join(cell(k) for k in paths) + f" | {chosen} | {peer or 'none'} | {paired(peer)} | "
            f"{paired(DYNAMIC)} |")


def profile_table(paths: dict, feed: dict, runs: int, prefix: Path) -> str:
    """onnxruntime's profiler on each model (1 thread, warm-up run first): ms per run by operator type (the sum
    of its nodes' median kernel times), the types that take at least 1 % of some model's time."""
    import json

    per_type = {}
    for k, path in paths.items():
        s = session(path, optimize=True, profile=f"{prefix}_{len(per_type)}")
        s.run(None, feed)
        for _ in range(runs):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
        durations: dict[tuple[str, str], list[float]] = {}  # (node, op type) -> its kernel time in each run
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                durations.setdefault((e["name"], e.get("args", {}).get("op_name", "?")), []).append(e["dur"] / 1e3)
        totals: dict[str, float] = {}
        for (_, op), times in durations.items():  # each node's median run: one slow run (a page fault, a
            totals[op] = totals.get(op, 0.0) + float(np.median(times))  # preemption) would swamp a mean
        per_type[k] = totals
    ops = sorted({op for t in per_type.values() for op, v in t.items() if v >= 0.01 * sum(t.values())},
                 key=lambda op: -max(t.get(op, 0.0) for t in per_type.values()))
    lines = ["| operator | " + " | ".join(per_type) + " |", "|---|" + "---|" * len(per_type)]
    lines += [f"| {op} | " + " | ".join(f"{t.get(op, 0.0):.4f}" for t in per_type.values()) + " |" for op in ops]
    lines.append("| all kernels | " + " | ".join(f"{sum(t.values()):.4f}" for t in per_type.values()) + " |")
    return "\n".join(lines)


def describe(result: dict) -> str:
    if "accuracy" in result:
        return f"{result['accuracy'] * 100:.1f}%"
    if "sentence_mean" in result:
        return f"{result['sentence_mean']:.4f} / {result['sentence_worst']:.4f}"
    return f"cos {result['cosine']:.5f}"


if __name__ == "__main__":
    main()
