"""int8 latency against onnxruntime's own int8 models of the same network: onnxopt quantize (auto, static,
dynamic) against onnxruntime's quantize_dynamic and quantize_static (QDQ, per channel, MinMax / Percentile /
Entropy) and fp32.

    python benchmarks/bench_quantize_latency.py [--models ../shared/models] [--only a,b] [--rounds 200] [--block 8]
                                                [--threads 1,2] [--quantizers "onnxopt (default: auto),ort quantize_dynamic"]
                                                [--profile benchmarks/out/profiles]

Issue 9's latency target compares onnxopt's default with the fastest of onnxruntime's int8 models *that keep
accuracy*: so every model is scored on the eval data first (labelled models: accuracy within 0.5 point of fp32;
the sentence encoders: sentence cosine mean >= 0.998 and worst >= 0.995, as bench_quantize.py measures them).
Latency: onnxruntime CPU, all graph optimizations, batch 1, one eval sample, intra_op_num_threads as --threads
says (inter op 1; OpenMP / OpenBLAS / MKL pinned to 1 thread), one session per model and thread count, all
alive at once. Each round runs every session for a block of --block runs (the first not counted: it finds the
caches the others used) and keeps the block's fastest run (load from other processes only ever adds time),
the sessions' order rotating from round to round. The ratio of two models is paired per round (the same
moment, so the same load), and reported as the median of the --rounds per-round ratios with a 95 % bootstrap
confidence interval of that median: "no slower" holds when the interval's upper end is <= 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads them
    os.environ.setdefault(_pool, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from bench_quantize import (auto_choice, ort_dynamic, ort_static, ours, outputs,  # noqa: E402
                            sentence_cosines, sentence_lengths)
from common import cases, score, session  # noqa: E402
from onnxopt.data import load_feeds  # noqa: E402

DEFAULT = "onnxopt (default: auto)"
OURS = {
    DEFAULT: lambda p, c, o: ours(p, c, o),
    "onnxopt static": lambda p, c, o: ours(p, c, o, mode="static"),
    "onnxopt dynamic": lambda p, c, o: ours(p, c, o, mode="dynamic"),
    "onnxopt dynamic smooth_mul=false": lambda p, c, o: ours(p, c, o, mode="dynamic", smooth_mul=False),
    # the default as it was before it wrote residual Adds as Sum (onnxruntime then fuses SkipLayerNormalization)
    "onnxopt residual_sum=false": lambda p, c, o: ours(p, c, o, residual_sum=False),
}
DYNAMIC = "ort quantize_dynamic"  # issue 9's latency peer for transformers, accurate or not
# the A/A control: a second file and session of the same quantize_dynamic model; its ratio to the first shows
# what the bootstrap interval cannot, a session's own fixed bias (where its buffers landed), so the noise floor
TWIN = "ort quantize_dynamic twin"
PEERS = {
    DYNAMIC: ort_dynamic,
    TWIN: ort_dynamic,
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
    parser.add_argument("--rounds", type=int, default=200, help="paired rounds (each: one block per session)")
    parser.add_argument("--block", type=int, default=8, help="runs per session per round, the first not counted")
    parser.add_argument("--threads", default="1", help="comma-separated intra-op thread counts, each measured "
                        "with every model, all in the same rounds (e.g. 1,2)")
    parser.add_argument("--profile", type=Path, help="also run onnxruntime's profiler (1 thread, --rounds runs) on "
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
    qualities, tables, to_dynamic = [], {t: [] for t in threads}, {t: [] for t in threads}
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
            rounds = paired_rounds(paths, feed, threads, args.rounds, args.block)
            accurate = [k for k in peers_now if k != TWIN and keeps_accuracy(quality[k], quality["fp32"])]
            sizes = {k: p.stat().st_size / model_path.stat().st_size for k, p in paths.items()}
            for t in threads:
                tables[t].append(row(name, list(paths), rounds[t], sizes, quality, accurate, chosen))
                if DYNAMIC in paths:
                    to_dynamic[t].append(f"| {name} | " + " | ".join(
                        paired_ratio(rounds[t][:, i] / rounds[t][:, list(paths).index(DYNAMIC)])
                        for i, k in enumerate(paths) if k != DYNAMIC) + " |")
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                print(f"\nonnxruntime profile, {name}, 1 thread, {args.rounds} runs: ms per run by operator type\n")
                print(profile_table(paths, feed, args.rounds, args.profile / name.replace("/", "_")))
            qualities.append((name, quality))
    columns = ["fp32", *ours_now, *peers_now]
    for t in threads:
        print(f"\nLatency, intra_op_num_threads={t}: ms, median over {args.rounds} rounds of each round's fastest "
              f"of {args.block - 1} runs [5th - 95th percentile] (× fp32, file × fp32; ✗: loses accuracy); default "
              "× the fastest accurate ort peer, and × quantize_dynamic's model: the median of the paired per-round "
              "ratios [95 % bootstrap confidence interval of that median]\n")
        print("| model | " + " | ".join(columns) + " | auto chose | fastest accurate ort | default × that | "
              "default × ort quantize_dynamic |")
        print("|---|" + "---|" * (len(columns) + 4))
        print("\n".join(tables[t]))
        if to_dynamic[t]:
            print(f"\nEvery model × ort quantize_dynamic's, intra_op_num_threads={t}: median of the paired per-round "
                  "ratios [95 % bootstrap confidence interval]\n")
            others = [k for k in columns if k != DYNAMIC]
            print("| model | " + " | ".join(others) + " |")
            print("|---|" + "---|" * len(others))
            print("\n".join(to_dynamic[t]))
    print("\nAccuracy on the eval data (labelled: top-1; sentence encoders: sentence cosine mean / worst):\n")
    print("| model | " + " | ".join(columns[1:]) + " |")
    print("|---|" + "---|" * (len(columns) - 1))
    for name, quality in qualities:
        print(f"| {name} | " + " | ".join(describe(quality[k]) for k in columns[1:]) + " |")


def paired_rounds(paths: dict[str, Path], feed: dict, threads: list[int], rounds: int, block: int
                  ) -> dict[int, np.ndarray]:
    """Per thread count, (rounds, models) ms: every session (one per model and thread count, all alive at once)
    runs a block of ``block`` runs per round, the first not counted, and the round keeps the block's fastest;
    the order of the sessions rotates from round to round, so no model always follows the same other one."""
    sessions = [(t, i, session(path, optimize=True, threads=t))
                for t in threads for i, path in enumerate(paths.values())]
    for _, _, s in sessions:
        for _ in range(block):
            s.run(None, feed)
    times = {t: np.zeros((rounds, len(paths))) for t in threads}
    for r in range(rounds):
        for t, i, s in sessions[r % len(sessions):] + sessions[:r % len(sessions)]:
            s.run(None, feed)
            best = np.inf
            for _ in range(block - 1):
                start = time.perf_counter()
                s.run(None, feed)
                best = min(best, time.perf_counter() - start)
            times[t][r, i] = best * 1e3
    return times


def bootstrap_median(values: np.ndarray, resamples: int = 5000, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``values`` and a 95 % percentile-bootstrap confidence interval of it."""
    medians = np.median(np.random.default_rng(seed).choice(values, (resamples, len(values))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(values)), float(low), float(high)


def paired_ratio(ratios: np.ndarray) -> str:
    median, low, high = bootstrap_median(ratios)
    return f"{median:.3f} [{low:.3f} - {high:.3f}]"


def row(name: str, names: list[str], times: np.ndarray, sizes: dict, quality: dict, accurate: list[str],
        chosen: str) -> str:
    """One table row: each model's median latency with the spread of the rounds, and the paired ratios."""
    column = {k: times[:, i] for i, k in enumerate(names)}
    ms = {k: float(np.median(v)) for k, v in column.items()}
    peer = min(accurate, key=ms.get) if accurate else None

    def cell(k: str) -> str:
        mark = "" if keeps_accuracy(quality[k], quality["fp32"]) else " ✗"
        low, high = np.percentile(column[k], [5, 95])
        return f"{ms[k]:.3f} [{low:.3f} - {high:.3f}] ({ms[k] / ms['fp32']:.2f}, {sizes[k]:.3f}×){mark}"

    def paired(other: str | None) -> str:
        if other not in column or DEFAULT not in column:
            return "—"
        return paired_ratio(column[DEFAULT] / column[other])

    return (f"| {name} | " + " | ".join(cell(k) for k in names) + f" | {chosen} | {peer or 'none'} | "
            f"{paired(peer)} | {paired(DYNAMIC)} |")


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
