"""Ray executor vs in-process, side by side in one run, on the shared transformer (minilm_l3).

Three jobs, each under every executor in turn:
- validation: ``optimize(model, "dce", data=N samples)`` (the original and the result on every sample,
  the exact gate, the noise measurement): all of it is validation work;
- ``quantize(mode=dynamic,min_cosine=0.99)``: calibration statistics, the accuracy-aware trials (built
  here, scored on the workers) and validation go through the executor (the mode fixed: ``auto`` chooses by
  measured latency, which load on the machine can tip, and the rows would then do different work);
- reconstruction statistics: the ``prune(sparsity=0.5, method=sparsegpt)`` pass alone on N/4 calibration
  samples: layer by layer, each layer's XᵀX summed where its shard's activations are (the SparseGPT
  solves run here, between the layers).
Executors: the default (outputs held in this process, onnxruntime's default threads), the in-process
executor (sharded sums, one thread), Ray with 1 and 2 workers (one thread each; a local Ray instance
with 2 CPUs). Reported: wall seconds, speed-up of Ray 2 workers over Ray 1 worker and over the default,
and each Ray worker's peak resident memory (fresh worker processes per executor), for N and N/4
samples (flat means it does not grow with the data), and CPU seconds of this process and of each worker:
on a loaded machine wall time depends on what else runs, CPU seconds show how the work was split.
``--pairs K`` then runs Ray 1 and 2 workers K more times in turns (1, 2, 2, 1, ...) for every job.

    python benchmarks/bench_ray.py [--samples 1024] [--skip-quantize] [--skip-sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from common import SHARED_MODELS

import onnxopt
from onnxopt.data import FeedSet
from onnxopt.executor import InProcess, RayExecutor
from onnxopt.modelio import load_model
from onnxopt.passes.base import PassContext
from onnxopt.passes.prune import Prune

MODEL = SHARED_MODELS / "minilm_l3"
QUANTIZE = "quantize(mode=dynamic,min_cosine=0.99)"


def tiled(path, count: int) -> dict[str, np.ndarray]:
    """``count`` samples: the real eval sentences repeated (the shared set has 128)."""
    with np.load(path) as npz:
        return {k: np.concatenate([npz[k]] * -(-count // len(npz[k])))[:count] for k in npz.files}


def run(job: str, executor_name: str, data, calib) -> dict:
    executor = {"in-process (held)": lambda: "in-process", "in-process executor": InProcess,
                "ray, 1 worker": lambda: RayExecutor(workers=1), "ray, 2 workers": lambda: RayExecutor(workers=2)}[
        executor_name]()
    start, cpu = time.perf_counter(), time.process_time()
    if job == "sparsegpt statistics":
        model = load_model(str(MODEL / "model.onnx"))
        start, cpu = time.perf_counter(), time.process_time()
        result = Prune(Prune.Options(sparsity=0.5, method="sparsegpt"),
                       PassContext(calib=FeedSet(calib, "calib"), executor=None if executor == "in-process" else executor)
                       )(model)
        seconds = time.perf_counter() - start
        row = {"job": job, "executor": executor_name, "samples": len(next(iter(calib.values()))),
               "seconds": round(seconds, 2), "passed": True, "sparsity": round(result.stats["sparsity"], 4),
               "checksum": float(sum(abs(w).sum() for w in _weights(result.model)))}
    elif job == "validation":
        result = onnxopt.optimize(str(MODEL / "model.onnx"), "dce", data=data, executor=executor)
    else:
        result = onnxopt.optimize(str(MODEL / "model.onnx"), QUANTIZE, calib=calib, data=data,
                                  min_cosine=0, executor=executor)
    if job != "sparsegpt statistics":
        seconds = time.perf_counter() - start
        row = {"job": job, "executor": executor_name, "samples": len(next(iter(data.values()))),
               "seconds": round(seconds, 2), "passed": result.report.passed,
               "cosine": round(result.report.steps[-1].vs_original["outputs"]["hidden"]["cosine"], 6)}
        kept = [s.stats["kept_float"] for s in result.report.steps if "kept_float" in s.stats]
        if kept:
            row["kept_float"] = kept[0]
    row["driver_cpu_s"] = round(time.process_time() - cpu, 2)
    if isinstance(executor, RayExecutor):
        row["worker_peak_mib"] = [round(b / 2**20) for b in executor.peak_memory()]
        row["worker_cpu_s"] = [round(s, 2) for s in executor.cpu_seconds()]
        row["tasks"] = executor.tasks
    if not isinstance(executor, str):
        executor.close()
    print(json.dumps(row), flush=True)
    return row


def _weights(model):
    from onnx import numpy_helper

    return [numpy_helper.to_array(t).astype("float64") for t in model.graph.initializer if t.data_type == 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--skip-quantize", action="store_true")
    parser.add_argument("--skip-sparsegpt", action="store_true")
    parser.add_argument("--only-sparsegpt", action="store_true")
    parser.add_argument("--pairs", type=int, default=0)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    data, small = tiled(MODEL / "eval.npz", args.samples), tiled(MODEL / "eval.npz", args.samples // 4)
    calib = str(MODEL / "calib.npz")
    jobs = {"sparsegpt statistics": (None, tiled(MODEL / "calib.npz", args.samples // 4)), "validation": (data, calib),
            QUANTIZE: (tiled(MODEL / "eval.npz", 128), calib)}
    executors = ["in-process (held)", "in-process executor", "ray, 1 worker", "ray, 2 workers"]
    rows = []
    if not args.skip_sparsegpt:  # the checksum (sum of |weights|) shows the same pruned model under every executor
        rows += [run("sparsegpt statistics", name, *jobs["sparsegpt statistics"]) for name in executors]
    if args.only_sparsegpt:
        args.skip_quantize = True
    else:
        rows += [run("validation", name, small, calib) for name in ("ray, 1 worker", "ray, 2 workers")]
        rows += [run("validation", name, *jobs["validation"]) for name in executors]
    if not args.skip_quantize:
        rows += [run(QUANTIZE, name, *jobs[QUANTIZE]) for name in executors]
    for k in range(args.pairs):
        for job, inputs in jobs.items():
            if job in {r["job"] for r in rows}:
                rows += [run(job, name, *inputs)
                         for name in (("ray, 1 worker", "ray, 2 workers") if k % 2 else ("ray, 2 workers", "ray, 1 worker"))]
    print("| job | executor | samples | seconds | x vs ray 1 worker | x vs held | worker peak MiB | driver CPU s | "
          "worker CPU s | cosine |")
    print("|---|---|---:|---:|---:|---:|---|---:|---|---:|")  # held: the default (no executor); peers: their best run
    for row in rows:
        peers = {}
        for r in rows:
            if r["job"] == row["job"] and r["samples"] == row["samples"]:
                peers[r["executor"]] = min(peers.get(r["executor"], r["seconds"]), r["seconds"])
        ratio = lambda peer: f"{peers[peer] / row['seconds']:.2f}" if peer in peers else ""  # noqa: E731
        print(f"| {row['job']} | {row['executor']} | {row['samples']} | {row['seconds']} | {ratio('ray, 1 worker')} | "
              f"{ratio('in-process (held)')} | {row.get('worker_peak_mib', '')} | {row['driver_cpu_s']} | "
              f"{row.get('worker_cpu_s', '')} | {row.get('cosine', '')} |")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    print(json.dumps(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
