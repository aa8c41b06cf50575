"""Layer-wise reconstruction side by side: Wanda, Wanda + distill, SparseGPT, SparseGPT + distill, and
onnxsim's apply_sparsegpt_pruning; distill's wall time against fp32 passes; learned vs nearest int8 rounding.

    python benchmarks/bench_distill.py [--models ../shared/models] [--samples samples] [--skip-onnxsim]
                                       [--skip-rounding] [--sections prune,int8,int4] [--sample-data 1024]
                                       [--baseline ../main] [--repeat 3]

Every shared model and sample with eval data, 50 % unstructured, all in one run. Scores on the EVAL
file (never seen by prune or distill): top-1 accuracy where labels exist, minilm_l3's sentence
cosine (masked-mean embedding, as its info.json says), otherwise output cosine to the dense model.
The samples are scored on larger sets than their 64-sample files (one sample of 64 is 1.6 points of
accuracy; 64 calibration rows leave a 256-input layer unobserved in most directions): ``--sample-data``
calibration and eval samples drawn by samples/build_samples.py from the files' own seeds (0: the files).
"recovered" is the share of what Wanda alone loses that SparseGPT + distill wins back (target ≥ 2/3).
Distill runs with numpy's BLAS limited to 1 thread and unlimited; its wall time is given in fp32 passes
over the calibration data (onnxruntime, 1 thread, graph optimizations off, measured in the same run,
before and after), and so is its process CPU time (robust to load from other processes).
Rounding: int8 `quantize` with `rounding=nearest` vs `rounding=learned` (with its held-out check: learned
rounding's statistics come from 3/4 of the calibration samples, and its weights are kept only where the model
is no worse than with nearest rounding on the other quarter), and int4 weight-only
`quantize-weights` (block 32, tables left float) RTN / RTN + learned / GPTQ / GPTQ + learned (same scores).
``--repeat N``: distill N times per thread setting and the fp32 pass N times before and after, the
fastest of each kept (steadier on a loaded machine). ``--baseline``: another checkout's distill runs right
after this one's on the same pruned models (same load): its time in fp32 passes beside ours, whether both
return the same model, byte for byte, and both repaired models' scores.
Prints markdown tables and writes benchmarks/out/bench_distill.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from common import SAMPLES, SHARED_MODELS, cases, fmt, outputs  # noqa: E402
from onnxopt.data import load_feeds, name_positional_inputs  # noqa: E402
from onnxopt.modelio import copy_model  # noqa: E402
from onnxopt.passes.base import PassContext  # noqa: E402
from onnxopt.passes.distill import Distill  # noqa: E402
from onnxopt.validate import output_metrics, Tolerances, task_accuracy  # noqa: E402

WEIGHT_ONLY = [("rtn", "nearest"), ("rtn", "learned"), ("gptq", "nearest"), ("gptq", "learned")]
PRUNE = {"wanda": "prune(sparsity=0.5,method=wanda)", "sparsegpt": "prune(sparsity=0.5,method=sparsegpt)"}


def scorer(name: str, folder: Path, labels):
    """The task score of outputs (per-sample lists of the first output) against the dense ones."""
    lengths = folder / "eval.lengths.npz"
    if lengths.exists():  # sentence embeddings: masked mean over real tokens, L2-normalised
        with np.load(lengths) as data:
            counts = data[data.files[0]].reshape(-1)

        def embed(values):
            e = np.stack([v.reshape(-1, v.shape[-1])[:n].mean(axis=0) for v, n in zip(values, counts)])
            return e / np.linalg.norm(e, axis=1, keepdims=True)

        return "sentence cosine", lambda dense, out: float(np.mean(np.sum(embed(dense) * embed(out), axis=1)))
    if labels is not None:
        return "accuracy", lambda dense, out: task_accuracy({"output": list(out)}, labels)
    return "output cosine", lambda dense, out: output_metrics(list(dense), list(out), Tolerances()).cosine


def onnxsim_sparsegpt(model, calib):
    from onnxsim.pruning import apply_sparsegpt_pruning

    with contextlib.redirect_stdout(io.StringIO()):
        return apply_sparsegpt_pruning(copy_model(model), calibration_data=list(calib), num_samples=len(calib),
                                       sparsity=0.5)


def fp32_pass_seconds(model, calib) -> tuple[float, float]:
    """(wall, process CPU) seconds of one plain fp32 pass."""
    start, cpu = time.perf_counter(), time.process_time()
    outputs(model, calib, optimize=False)
    return time.perf_counter() - start, time.process_time() - cpu


def distill_seconds(pruned, teacher, calib, threads, package=None) -> tuple[onnx.ModelProto, float, dict, float]:
    """(repaired model, wall s, stats, process CPU s); ``package``: another checkout's onnxopt
    (:func:`checkout`) instead of this one, given the samples as its own ``FeedSet`` (ours is not one to it:
    it would run them one sample at a time, 1.6x the time on digits_mlp)."""
    distill, context = (Distill, PassContext) if package is None else package[:2]
    if package is not None:
        calib = package[2](calib.arrays, calib.origin)
    start, cpu = time.perf_counter(), time.process_time()
    with threadpool_limits(limits=threads, user_api="blas"):
        result = distill(None, context(calib=calib, teacher=lambda: teacher))(copy_model(pruned))
    return result.model, time.perf_counter() - start, result.stats, time.process_time() - cpu


def checkout(root: Path) -> tuple[type, type, type]:
    """(Distill, PassContext, FeedSet) of the onnxopt in another checkout, imported beside this one as
    ``onnxopt_baseline`` (its imports are relative): both distill in one run, under the same load."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnxopt_baseline", root / "onnxopt" / "__init__.py",
                                                  submodule_search_locations=[str(root / "onnxopt")])
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[spec.name])
    return (importlib.import_module("onnxopt_baseline.passes.distill").Distill,
            importlib.import_module("onnxopt_baseline.passes.base").PassContext,
            importlib.import_module("onnxopt_baseline.data").FeedSet)


def sample_data(name: str, samples: int, folder: Path) -> tuple[Path, Path, np.ndarray | None]:
    """(calib, eval, labels) of a sample model, ``samples`` of each drawn by its own generator, as npz files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_samples", SAMPLES / "build_samples.py")
    builder = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(builder)  # registered first: onnxscript's @script reads the module's globals
    sample = builder.BUILDERS[name](samples)
    folder.mkdir(parents=True, exist_ok=True)
    calib, evals = folder / f"{name}.calib{samples}.npz", folder / f"{name}.eval{samples}.npz"
    np.savez(calib, **sample.calib)
    np.savez(evals, **sample.eval)
    return calib, evals, sample.labels


def fastest(row: dict, key: str, threads, seconds: float, cpu: float) -> None:
    """Keep the smallest wall and CPU seconds seen under ``key`` for the thread setting."""
    for kind, value in (("s", seconds), ("cpu_s", cpu)):
        name = f"{key}_{kind}_{threads or 'all'}_threads"
        row[name] = min(row.get(name, value), value)


def prune_rows(row: dict, model, calib, evals, dense, task, baseline=None, repeat: int = 1) -> None:
    """Wanda and SparseGPT, each alone and + distill (1 and all BLAS threads), into ``row``; the ``baseline``
    checkout's distill beside ours."""
    passes = [fp32_pass_seconds(model, calib) for _ in range(repeat)]
    for method, pipeline in PRUNE.items():
        start = time.perf_counter()
        pruned = onnxopt.optimize(model, pipeline, calib=calib, validate=False).model
        row[f"{method}_prune_s"] = time.perf_counter() - start
        row[method] = task(dense, outputs(pruned, evals, optimize=False))
        for threads in (1, None):
            for _ in range(repeat):  # the fastest of the repeats: what the load took least from
                repaired, seconds, stats, cpu = distill_seconds(pruned, model, calib, threads)
                fastest(row, f"{method}_distill", threads, seconds, cpu)
                if baseline is not None:  # right after, under the same load
                    theirs, seconds, _, cpu = distill_seconds(pruned, model, calib, threads, baseline)
                    fastest(row, f"{method}_baseline_distill", threads, seconds, cpu)
                    row[f"{method}_baseline_same_model"] = (
                        row.get(f"{method}_baseline_same_model", True)
                        and theirs.SerializeToString() == repaired.SerializeToString())
        if baseline is not None:
            row[f"{method}+baseline_distill"] = task(dense, outputs(theirs, evals, optimize=False))
        row[f"{method}+distill"] = task(dense, outputs(repaired, evals, optimize=False))
        row[f"{method}_distill_stats"] = stats
    passes += [fp32_pass_seconds(model, calib) for _ in range(repeat)]
    # one pass before and one after: their mean; with repeats, the fastest, as distill's
    row["fp32_pass_s"], row["fp32_pass_cpu_s"] = (float(np.mean(c) if repeat == 1 else np.min(c)) for c in zip(*passes))
    lost = row["dense"] - row["wanda"]
    row["recovered"] = (row["sparsegpt+distill"] - row["wanda"]) / lost if lost > 0 else None


def rows_for(name, path, calib_path, eval_path, labels, skip_onnxsim: bool, sections: set[str], baseline=None,
             repeat: int = 1) -> dict:
    model = onnx.load(path)
    calib = name_positional_inputs(load_feeds(calib_path), model)
    evals = name_positional_inputs(load_feeds(eval_path), model)
    metric, task = scorer(name, Path(path).parent, labels)
    dense = outputs(model, evals, optimize=False)
    row = {"model": name, "metric": metric, "dense": task(dense, dense)}
    if "prune" in sections:
        prune_rows(row, model, calib, evals, dense, task, baseline, repeat)
    if not skip_onnxsim:
        start = time.perf_counter()
        try:
            pruned = onnxsim_sparsegpt(model, calib)
            row["onnxsim_sparsegpt"] = task(dense, outputs(pruned, evals, optimize=False))
            zeros = sum(int(np.count_nonzero(onnx.numpy_helper.to_array(t) == 0)) for t in pruned.graph.initializer)
            row["onnxsim_zeros"] = zeros
        except Exception as exc:  # a peer failing is a result, not a crash
            row["onnxsim_sparsegpt"] = f"{type(exc).__name__}: {str(exc)[:60]}"
        row["onnxsim_s"] = time.perf_counter() - start
    if "int8" in sections:
        # auto mode picks its plan by measured latency, which varies from run to run (minilm_l3: cosine 0.9990 or
        # 0.9992 with nearest rounding alone): both roundings run on the mode the default chose, pinned
        chosen = onnxopt.optimize(model, "quantize", calib=calib, validate=False).report.steps[-1].stats
        row["int8_mode"] = "dynamic" if chosen.get("mode_dynamic") else "static"
        for rounding in ("nearest", "learned"):
            start = time.perf_counter()
            quantized = onnxopt.optimize(model, f"quantize(mode={row['int8_mode']},rounding={rounding})",
                                         calib=calib, validate=False)
            row[f"int8_{rounding}_s"] = time.perf_counter() - start
            out = outputs(quantized.model, evals, optimize=False)
            row[f"int8_{rounding}"] = task(dense, out)
            row[f"int8_{rounding}_rel_err"] = output_metrics(list(dense), list(out), Tolerances()).rel_l2
            row[f"int8_{rounding}_holdout"] = quantized.report.steps[-1].details.get("rounding_holdout")
    if "int4" in sections:
        for method, rounding in WEIGHT_ONLY:
            start = time.perf_counter()
            with threadpool_limits(limits=1, user_api="blas"):
                quantized = onnxopt.optimize(model, f"quantize-weights(method={method},rounding={rounding},"
                                                    "embeddings=false)", calib=calib, validate=False)
            row[f"int4_{method}_{rounding}_s"] = time.perf_counter() - start
            if quantized.report.steps[-1].stats.get("layers_quantized"):
                row[f"int4_{method}_{rounding}"] = task(dense, outputs(quantized.model, evals, optimize=False))
    return row


def holdout(check: dict | None) -> tuple[str, str]:
    """Learned rounding's held-out check as two table cells: the errors (and samples), and what was kept."""
    if not check:
        return "—", "—"
    return (f"{check['nearest']['rel_l2']:.4f} / {check['learned']['rel_l2']:.4f} ({check['samples']})",
            check["kept"])


def table(rows: list[dict]) -> str:
    lines = []
    if any("wanda" in r for r in rows):
        lines += ["| model | metric | dense | wanda | wanda + distill | sparsegpt | sparsegpt + distill | recovered | "
                  "onnxsim sparsegpt | fp32 pass s | distill s (1 / all BLAS threads) | distill / fp32 pass (wall) | "
                  "distill / fp32 pass (CPU, 1 thread) |",
                  "|---" * 13 + "|"]
    for r in (r for r in rows if "wanda" in r):
        sim = r.get("onnxsim_sparsegpt")
        sim = "—" if sim is None else sim if isinstance(sim, str) else \
            f"{sim:.4f}{' (0 zeros)' if not r.get('onnxsim_zeros') else ''} in {r['onnxsim_s']:.1f} s"
        one, every = r["sparsegpt_distill_s_1_threads"], r["sparsegpt_distill_s_all_threads"]
        lines.append(
            f"| {r['model']} | {r['metric']} | {r['dense']:.4f} | {r['wanda']:.4f} | {r['wanda+distill']:.4f} | "
            f"{r['sparsegpt']:.4f} | {r['sparsegpt+distill']:.4f} | {fmt(r['recovered'], 2)} | {sim} | "
            f"{r['fp32_pass_s']:.2f} | {one:.2f} / {every:.2f} | {max(one, every) / r['fp32_pass_s']:.1f} | "
            f"{r['sparsegpt_distill_cpu_s_1_threads'] / r['fp32_pass_cpu_s']:.1f} |")
    if any("sparsegpt_baseline_same_model" in r for r in rows):
        lines += ["", "| model | distill / fp32 pass, 1 / all BLAS threads (wall) | baseline | "
                      "CPU, 1 thread | baseline CPU | same model as the baseline (wanda, sparsegpt) | "
                      "wanda + distill, baseline | sparsegpt + distill, baseline |", "|---" * 8 + "|"]
        for r in rows:
            if "sparsegpt_baseline_same_model" in r:
                ours, theirs = ([r[f"sparsegpt{k}_distill_s_{t}_threads"] / r["fp32_pass_s"] for t in (1, "all")]
                                for k in ("", "_baseline"))
                cpu = [r[f"sparsegpt{k}_distill_cpu_s_1_threads"] / r["fp32_pass_cpu_s"] for k in ("", "_baseline")]
                lines.append(f"| {r['model']} | {ours[0]:.1f} / {ours[1]:.1f} | {theirs[0]:.1f} / {theirs[1]:.1f} | "
                             f"{cpu[0]:.1f} | {cpu[1]:.1f} | {r['wanda_baseline_same_model']}, "
                             f"{r['sparsegpt_baseline_same_model']} | {r['wanda+distill']:.4f}, "
                             f"{r['wanda+baseline_distill']:.4f} | {r['sparsegpt+distill']:.4f}, "
                             f"{r['sparsegpt+baseline_distill']:.4f} |")
    if any("int8_nearest" in r for r in rows):
        lines += ["", "| model | metric | mode | dense | int8 nearest | int8 learned | rel err nearest | rel err learned | "
                      "held-out rel err nearest / learned (samples) | kept | quantize s nearest / learned |",
                  "|---" * 11 + "|"]
        lines += [f"| {r['model']} | {r['metric']} | {r['int8_mode']} | {r['dense']:.4f} | {r['int8_nearest']:.4f} | "
                  f"{r['int8_learned']:.4f} | {r['int8_nearest_rel_err']:.4f} | {r['int8_learned_rel_err']:.4f} | "
                  f"{' | '.join(holdout(r['int8_learned_holdout']))} | {r['int8_nearest_s']:.1f} / {r['int8_learned_s']:.1f} |"
                  for r in rows if "int8_nearest" in r]
    if any("int4_rtn_nearest" in r for r in rows):
        names = [f"{m}{' + learned' if r == 'learned' else ''}" for m, r in WEIGHT_ONLY]
        lines += ["", f"| model | metric | int4 {' | int4 '.join(names)} | seconds (same order) |",
                  "|---" * (3 + len(names)) + "|"]
        lines += [f"| {r['model']} | {r['metric']} | "
                  + " | ".join(fmt(r.get(f"int4_{m}_{o}")) for m, o in WEIGHT_ONLY) + " | "
                  + " / ".join(f"{r[f'int4_{m}_{o}_s']:.1f}" for m, o in WEIGHT_ONLY) + " |"
                  for r in rows if "int4_rtn_nearest" in r]
    return "\n".join(lines).strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    parser.add_argument("--skip-onnxsim", action="store_true")
    parser.add_argument("--skip-rounding", action="store_true", help="leave out the int8 and int4 sections")
    parser.add_argument("--sections", default="prune,int8,int4",
                        help="comma-separated: prune (Wanda / SparseGPT / distill), int8 (learned vs nearest "
                             "rounding), int4 (weight-only RTN / GPTQ, with and without learned rounding)")
    parser.add_argument("--sample-data", type=int, default=1024, help="calibration and eval samples drawn for "
                        "the sample models (0: their 64-sample files)")
    parser.add_argument("--repeat", type=int, default=1, help="distill runs per thread setting (the fastest "
                        "kept, wall and CPU apart): steadier on a loaded machine")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout (its root): its distill "
                        "runs right after this one's on the same pruned models, timed and compared")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    baseline = checkout(args.baseline) if args.baseline else None
    sections = set(args.sections.split(",")) - ({"int8", "int4"} if args.skip_rounding else set())
    rows = []
    out = ROOT / "benchmarks" / "out"
    for name, *case in cases(args.models, args.samples, only=args.only):
        print(name, file=sys.stderr)
        if name.startswith("samples/") and args.sample_data:
            case[1], case[2], case[3] = sample_data(name.split("/", 1)[1], args.sample_data, out / "sample_data")
        rows.append(rows_for(name, *case, args.skip_onnxsim, sections, baseline, args.repeat))
        print(table(rows[-1:]), file=sys.stderr)
    print(table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
