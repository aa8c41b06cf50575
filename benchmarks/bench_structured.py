"""Structured pruning of transformers: prune-neurons(ratio) + zero-rows, with and without distill, vs dense.

    python benchmarks/bench_structured.py [--models ../shared/models] [--ratio 0.25] [--rounds 300] [--sweep]
        [--threads 1]

On samples/transformer and minilm_l3 (attention heads and MLP units of every block): serialized
bytes, parameters, onnxruntime latency and the task score against the dense model, in one run.
``prune-neurons`` side by side: Wanda per group without bias correction (as before it existed),
Wanda per group with it (the default), and the fluctuation score with one global budget, each
without and with ``distill`` (the pass as it is, run before zero-rows so the pruned neurons stay
dead and removable); all on the model's calibration file. Every model, the dense one included,
ends with the same clean-ups (``cleanup``), so a ratio is pruning's alone. ``--sweep`` adds, for
the sample, the one-sample latency at growing ratios (fluctuation, global): what pruning cannot
remove is the intercept (``profile_structured.py`` shows where it goes). Latency: all graph
optimizations, ``--threads`` intra-op threads (1), one sample; the models are timed interleaved
(each round runs every model once, in turn), so load from elsewhere hits all of them alike; the
median and the interquartile range per model over ``--rounds`` rounds are reported, and the speed-up
is the median (and IQR) over rounds of dense / model within a round, so a busy spell that slows
whole rounds cancels; where the batch is symbolic, also on 64 samples at once
(compute-bound, ``--rounds / 10`` rounds). Scores are on the EVAL file: output cosine for the
sample, the cosine of the masked-mean sentence embedding (its info.json) for minilm_l3. Prints a
markdown table; writes benchmarks/out/bench_structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy in distill: one thread, like onnxruntime

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from common import SAMPLES, SHARED_MODELS, interleaved_times, outputs, session  # noqa: E402
from onnxopt.data import load_feeds, name_positional_inputs  # noqa: E402
from onnxopt.graph import parameter_count  # noqa: E402

BATCH = 64
CLEANUP = "cleanup"  # every model's last step, the dense one's only one


def pipelines(ratio: float) -> list[str]:
    """The dense model (empty pipeline), then each prune-neurons setting alone and with distill."""
    settings = [f"prune-neurons(ratio={ratio},method=wanda,bias_correction=false)",
                f"prune-neurons(ratio={ratio},method=wanda)",
                f"prune-neurons(ratio={ratio},method=fluctuation,scope=global)"]
    return [CLEANUP, *(f"{prune}{tail},zero-rows,{CLEANUP}" for prune in settings for tail in ("", ",distill"))]


def sweep_pipelines(ratios=(0.25, 0.5, 0.75, 0.9)) -> list[str]:
    return [CLEANUP, *(f"prune-neurons(ratio={r},method=fluctuation,scope=global),zero-rows,{CLEANUP}"
                       for r in ratios)]


def sentence_embeddings(hidden: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
    """minilm_l3's score: the L2-normalised mean of ``hidden`` over each sample's real tokens."""
    pooled = np.stack([h.reshape(-1, h.shape[-1])[:n].mean(axis=0) for h, n in zip(hidden, lengths)])
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def cosine(reference: list[np.ndarray], output: list[np.ndarray], lengths: np.ndarray | None) -> float:
    if lengths is not None:  # per sentence, averaged
        return float(np.mean(np.sum(sentence_embeddings(reference, lengths)
                                    * sentence_embeddings(output, lengths), axis=1)))
    a, b = np.concatenate([r.ravel() for r in reference]), np.concatenate([o.ravel() for o in output])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def timed(rows: list[dict], key: str, models: list[onnx.ModelProto], feed: dict, rounds: int, threads: int) -> None:
    """Each row's ``key`` latency in ms, median and interquartile range over interleaved rounds, and
    ``key`` speed-up: the median over rounds of the first model's time over this one's in the same
    round (a busy spell that slows a whole round cancels), with its interquartile range."""
    times = interleaved_times([(session(m, threads=threads), feed) for m in models], rounds)
    ratios = times[:, :1] / times
    for row, column, ratio in zip(rows, times.T * 1e3, ratios.T):
        q1, median, q3 = np.percentile(column, [25, 50, 75])
        row[f"{key}_ms"], row[f"{key}_iqr_ms"] = float(median), [float(q1), float(q3)]
        q1, median, q3 = np.percentile(ratio, [25, 50, 75])
        row[f"{key}_speedup"], row[f"{key}_speedup_iqr"] = float(median), [float(q1), float(q3)]


def cases(models: Path) -> list[tuple[str, Path, Path, Path, np.ndarray | None]]:
    found = [("samples/transformer", SAMPLES / "transformer.onnx", SAMPLES / "transformer.calib.npz",
              SAMPLES / "transformer.eval.npz", None)]
    minilm = models / "minilm_l3"
    if (minilm / "model.onnx").exists():
        found.append(("minilm_l3", minilm / "model.onnx", minilm / "calib.npz", minilm / "eval.npz",
                      np.load(minilm / "eval.lengths.npz")["lengths"]))
    return found


def rows_for(name: str, path: Path, calib_path: Path, eval_path: Path, lengths, settings: list[str], rounds: int,
             threads: int) -> list[dict]:
    model = onnx.load(path)
    calib = name_positional_inputs(load_feeds(calib_path), model)
    evals = name_positional_inputs(load_feeds(eval_path), model)
    dense = outputs(model, evals, optimize=False)
    rows, built = [], []
    for pipeline in settings:
        start = time.perf_counter()
        optimized = onnxopt.optimize(model, pipeline, calib=calib, validate=False).model
        built.append(optimized)
        rows.append({"model": name, "setting": "dense" if pipeline == CLEANUP else pipeline,
                     "seconds": time.perf_counter() - start,
                     "bytes": optimized.ByteSize(), "params": parameter_count(optimized.graph),
                     "layer_params": layer_parameters(optimized),
                     "cosine": cosine(dense, outputs(optimized, evals, optimize=False), lengths)})
    samples = list(evals)
    timed(rows, "latency", built, samples[0], rounds, threads)
    if _symbolic_batch(model):  # the same models on a batch of 64 samples: compute-bound
        batch = {name: np.concatenate([s[name] for s in samples[:BATCH]]) for name in samples[0]}
        timed(rows, "batch_latency", built, batch, max(rounds // 10, 10), threads)
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / rows[0]["bytes"]
        row["params_ratio"] = row["params"] / rows[0]["params"]
        row["layer_params_ratio"] = row["layer_params"] / rows[0]["layer_params"]
    return rows


def layer_parameters(model: onnx.ModelProto) -> int:
    """Elements of the MatMul / Gemm weights and biases: what structured pruning can reach (not embeddings)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in sizes]
    outputs_ = {n.output[0] for n in layers}
    names = {name for n in layers for name in n.input[1:3]}
    names |= {name for n in model.graph.node if n.op_type == "Add" and outputs_ & set(n.input) for name in n.input}
    return sum(sizes.get(name, 0) for name in names)


def _symbolic_batch(model: onnx.ModelProto) -> bool:
    return all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)


def table(rows: list[dict]) -> str:
    header = (f"| model | pipeline | bytes | params | layer params | latency ms (IQR) | speed-up (IQR) "
              f"| {BATCH} samples ms (IQR) | speed-up (IQR) | cosine | build s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        batch = (f"{_spread(r['batch_latency_ms'], r['batch_latency_iqr_ms'])} | "
                 f"{_spread(r['batch_latency_speedup'], r['batch_latency_speedup_iqr'], 2, '×')}"
                 if "batch_latency_ms" in r else "— (fixed batch 1) | —")
        lines.append(f"| {r['model']} | {r['setting']} | {r['bytes']:,} ({r['bytes_ratio']:.2f}×) | "
                     f"{r['params']:,} ({r['params_ratio']:.2f}×) | {r['layer_params']:,} "
                     f"({r['layer_params_ratio']:.2f}×) | {_spread(r['latency_ms'], r['latency_iqr_ms'])} | "
                     f"{_spread(r['latency_speedup'], r['latency_speedup_iqr'], 2, '×')} | "
                     f"{batch} | {r['cosine']:.4f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _spread(median: float, iqr: list[float], digits: int = 3, unit: str = "") -> str:
    return f"{median:.{digits}f}{unit} ({iqr[0]:.{digits}f}–{iqr[1]:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--sweep", action="store_true", help="also time the sample at ratios 0.25-0.9")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    rows = [row for case in cases(args.models)
            for row in rows_for(*case, pipelines(args.ratio), args.rounds, args.threads)]
    print(table(rows))
    if args.sweep:
        sweep = rows_for(*cases(args.models)[0], sweep_pipelines(), args.rounds, args.threads)
        print(table(sweep))
        rows += [{**row, "sweep": True} for row in sweep]
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_structured.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
