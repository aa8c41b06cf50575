"""Ray executor vs in-process, side by side in one run, on the shared transformer (minilm_l3).

Two jobs, each under every executor in turn:
- validation: ``optimize(model, "dce", data=N samples)`` (the original and the result on every sample,
  the exact gate, the noise measurement): all of it is validation work;
- ``quantize(min_cosine=0.99)``: calibration statistics and validation go through the executor; the
  accuracy-aware trials still run in this process.
Executors: the default (outputs held in this process, onnxruntime's default threads), the in-process
executor (sharded sums, one thread), Ray with 1 and 2 workers (one thread each; a local Ray instance
with 2 CPUs). Reported: wall seconds, speed-up of Ray 2 workers over Ray 1 worker and over the default,
and each Ray worker's peak resident memory (fresh worker processes per executor), for N and N/4
samples (flat means it does not grow with the data).

    python benchmarks/bench_ray.py [--samples 1024] [--skip-quantize]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from common import SHARED_MODELS

import onnxopt
from onnxopt.executor import InProcess, RayExecutor

MODEL = SHARED_MODELS / "minilm_l3"


def tiled(path, count: int) -> dict[str, np.ndarray]:
    """``count`` samples: the real eval sentences repeated (the shared set has 128)."""
    with np.load(path) as npz:
        return {k: np.concatenate([npz[k]] * -(-count // len(npz[k])))[:count] for k in npz.files}


def run(job: str, executor_name: str, data, calib) -> dict:
    executor = {"in-process (held)": lambda: "in-process", "in-process executor": InProcess,
                "ray, 1 worker": lambda: RayExecutor(workers=1), "ray, 2 workers": lambda: RayExecutor(workers=2)}[
        executor_name]()
    start = time.perf_counter()
    if job == "validation":
        result = onnxopt.optimize(str(MODEL / "model.onnx"), "dce", data=data, executor=executor)
    else:
        result = onnxopt.optimize(str(MODEL / "model.onnx"), "quantize(min_cosine=0.99)", calib=calib, data=data,
                                  min_cosine=0, executor=executor)
    seconds = time.perf_counter() - start
    row = {"job": job, "executor": executor_name, "samples": len(next(iter(data.values()))),
           "seconds": round(seconds, 2), "passed": result.report.passed,
           "cosine": round(result.report.steps[-1].vs_original["outputs"]["hidden"]["cosine"], 6)}
    if isinstance(executor, RayExecutor):
        row["worker_peak_mib"] = [round(b / 2**20) for b in executor.peak_memory()]
        row["tasks"] = executor.tasks
    if not isinstance(executor, str):
        executor.close()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--skip-quantize", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    data, small = tiled(MODEL / "eval.npz", args.samples), tiled(MODEL / "eval.npz", args.samples // 4)
    calib = str(MODEL / "calib.npz")
    executors = ["in-process (held)", "in-process executor", "ray, 1 worker", "ray, 2 workers"]
    rows = [run("validation", name, small, calib) for name in ("ray, 1 worker", "ray, 2 workers")]
    rows += [run("validation", name, data, calib) for name in executors]
    if not args.skip_quantize:
        rows += [run("quantize(min_cosine=0.99)", name, tiled(MODEL / "eval.npz", 128), calib) for name in executors]
    print("| job | executor | samples | seconds | x vs ray 1 worker | x vs held | worker peak MiB | cosine |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        peers = {r["executor"]: r["seconds"] for r in rows if r["job"] == row["job"] and r["samples"] == row["samples"]}
        ratio = lambda peer: f"{peers[peer] / row['seconds']:.2f}" if peer in peers else ""  # noqa: E731
        print(f"| {row['job']} | {row['executor']} | {row['samples']} | {row['seconds']} | {ratio('ray, 1 worker')} | "
              f"{ratio('in-process (held)')} | {row.get('worker_peak_mib', '')} | {row['cosine']} |")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    print(json.dumps(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
