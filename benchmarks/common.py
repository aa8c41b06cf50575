"""What every benchmark shares: the models with their data, an onnxruntime session, outputs and scores."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.validate import Tolerances, output_metrics, run_model, task_accuracy

SHARED_MODELS = ROOT.parent / "shared" / "models"
SAMPLES = ROOT / "samples"


def cases(models: Path = SHARED_MODELS, samples: Path = SAMPLES, only: Sequence[str] | None = None
          ) -> Iterator[tuple[str, Path, Path, Path, np.ndarray | None]]:
    """(name, model, calib, eval, labels or None) for every shared model and sample with data."""
    found = [(folder.name, folder / "model.onnx", folder / "calib.npz", folder / "eval.npz", folder / "labels.npz")
             for folder in sorted(models.iterdir()) if (folder / "model.onnx").exists()] if models.is_dir() else []
    for model in sorted(samples.glob("*.onnx")):
        stem = model.with_suffix("")
        found.append((f"samples/{model.stem}", model, Path(f"{stem}.calib.npz"), Path(f"{stem}.eval.npz"),
                      Path(f"{stem}.labels.npz")))
    for name, model, calib, evals, labels in found:
        if only is None or name in only:
            yield name, model, calib, evals, np.load(labels)["labels"] if labels.exists() else None


def session(model: onnx.ModelProto | Path, optimize: bool = True, threads: int = 1,
            profile: str | None = None) -> ort.InferenceSession:
    """One thread (intra op; inter op always 1) unless told, as deployed latency is compared: all graph
    optimizations unless ``optimize=False``; ``profile``: onnxruntime's profiler on, its JSON file named with
    this prefix."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def interleaved_times(runs: Sequence[tuple[ort.InferenceSession, dict]], rounds: int, warmup: int = 10
                      ) -> np.ndarray:
    """(rounds, len(runs)) seconds of ``session.run(None, feed)`` per (session, feed): every round runs
    each once, in turn, starting one further along each round, so that neither load from elsewhere
    nor a place in the round (first after the others' runs, say) favours one of them."""
    for s, feed in runs:
        for _ in range(warmup):
            s.run(None, feed)
    times = np.zeros((rounds, len(runs)))
    for r in range(rounds):
        for i in np.roll(np.arange(len(runs)), -r):
            s, feed = runs[i]
            start = time.perf_counter()
            s.run(None, feed)
            times[r, i] = time.perf_counter() - start
    return times


def outputs(model: onnx.ModelProto | Path, feeds: Iterable[dict], optimize: bool = True) -> list[np.ndarray]:
    """The first output for every sample, in order (onnxopt's own session: one thread; all graph
    optimizations unless ``optimize=False``)."""
    if isinstance(model, Path):
        model = onnx.load(model)
    return next(iter(run_model(model, feeds, optimize=optimize).values()))


def score(reference: list, output: list, labels: np.ndarray | None) -> dict:
    """Cosine and relative L2 error of the first output to the reference, and top-1 accuracy if labelled
    (argmax over the last axis, as ``onnxopt.validate`` scores it).

    ``reference`` and ``output`` are per-sample lists (or sample-major arrays) of the first output.
    """
    metrics = output_metrics(list(reference), list(output), Tolerances())
    result = {"cosine": metrics.cosine, "rel_err": metrics.rel_l2}
    if labels is not None:
        result["accuracy"] = task_accuracy({"output": list(output)}, labels)
    return result


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` places, None as a dash."""
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
