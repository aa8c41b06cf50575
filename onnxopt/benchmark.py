"""onnxruntime CPU latency, throughput, file size and session peak memory of models compared side by side.

Models are timed interleaved, run by run (the order rotating and turning each run), on the same feeds, so
load from other processes and clock drift hit every model alike; ratios to the first model are
medians of the per-run ratios. Peak memory is measured in a fresh process per model: the peak
RSS (reset once the imports are done) above the RSS before the session was opened, while
onnxruntime loads the file and runs one sample; Linux only (elsewhere: not measured).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .data import Feed, as_feeds, random_feeds
from .errors import InputError
from .modelio import load_model, model_tensors, save_scratch
from .report import human_bytes
from .tensors import external_info, is_external, tensor_nbytes
from .validate import Session

SLOWER_RATIO = 1.05  # a result whose median per-run latency ratio exceeds this is reported as slower
FEED_SAMPLES = 16  # distinct samples cycled through the runs (each run feeds every model the same one)
WARMUP_RUNS = 3


@dataclass
class ModelTiming:
    """One model's figures; ``vs_first`` holds ratios to the first model (1.0 for the first itself)."""

    label: str
    file_bytes: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    spread: float  # (p90 - p10) / median
    throughput_per_s: float  # runs per second over all timed runs
    peak_memory_bytes: int | None
    vs_first: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Benchmark:
    threads: int
    runs: int
    feeds: dict[str, Any]
    onnxruntime: str
    models: list[ModelTiming]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def slower(self) -> list[ModelTiming]:
        """Models whose median latency ratio to the first model exceeds ``SLOWER_RATIO``."""
        return [m for m in self.models[1:] if (m.vs_first.get("latency") or 0) > SLOWER_RATIO]


ModelSource = onnx.ModelProto | str | os.PathLike


def benchmark(
    models: Sequence[ModelSource] | Mapping[str, ModelSource],
    *,
    data: Any = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int = 1,
    runs: int = 50,
    memory: bool = True,
) -> Benchmark:
    """Time ``models`` (paths or protos; a mapping gives them labels) interleaved on the same feeds.

    Feeds are ``data`` (any form :func:`onnxopt.data.as_feeds` takes) or seeded random samples
    for the first model's inputs. Sessions use onnxruntime's full graph optimizations, as a
    deployment would, with ``threads`` intra-op threads.
    """
    if runs < 1:
        raise InputError(f"bench: runs must be at least 1, not {runs}")
    if threads < 1:
        raise InputError(f"bench: threads must be at least 1, not {threads}")
    labelled = list(models.items()) if isinstance(models, Mapping) else [(_label(m, i), m) for i, m in enumerate(models)]
    if not labelled:
        raise InputError("bench: no models given")
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as scratch:
        paths, sizes, first = [], [], None
        for i, (label, source) in enumerate(labelled):
            path, model = _as_file(source, Path(scratch) / f"{i}", label)
            paths.append(path)
            sizes.append(_file_bytes(path, model))
            first = model if first is None else first
        if data is not None:
            feed_set, notes = as_feeds(data, first), []
        else:
            feed_set, notes = random_feeds(first, count=FEED_SAMPLES, input_shapes=input_shapes)
        del first
        samples = list(itertools.islice(feed_set, FEED_SAMPLES))
        times = _interleaved_times(labelled, paths, samples, threads, runs)
        peaks = [_peak_memory(path, samples[0], threads, Path(scratch)) if memory else None for path in paths]
    timings = [_summary(label, size, t, peak) for (label, _), size, t, peak in zip(labelled, sizes, times, peaks)]
    for timing, t in zip(timings, times):
        timing.vs_first = {
            "latency": float(np.median(t / times[0])),
            "throughput": timing.throughput_per_s / timings[0].throughput_per_s,
            "size": timing.file_bytes / timings[0].file_bytes,
            "memory": (timing.peak_memory_bytes / timings[0].peak_memory_bytes
                       if timing.peak_memory_bytes is not None and timings[0].peak_memory_bytes else None),
        }
    feeds = {"origin": feed_set.origin, "samples": len(samples), "notes": notes[1:]}  # notes[0]: "random feeds: ..."
    return Benchmark(threads, runs, feeds, ort.__version__, timings)


def _label(source: ModelSource, index: int) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"model {index + 1}"


def _as_file(source: ModelSource, folder: Path, label: str) -> tuple[Path, onnx.ModelProto]:
    """A file onnxruntime can open (protos are written without copying external weights) and the proto."""
    if isinstance(source, onnx.ModelProto):
        folder.mkdir()
        path = folder / "model.onnx"
        save_scratch(source, path)
        return path, source
    return Path(source), load_model(source)


def _file_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The .onnx file plus the bytes its tensors keep in external-data files."""
    external = sum(int(external_info(t).get("length", tensor_nbytes(t))) for t in model_tensors(model) if is_external(t))
    return path.stat().st_size + external


def _interleaved_times(labelled, paths: list[Path], samples: list[Feed], threads: int, runs: int) -> np.ndarray:
    """Seconds per run, ``[model, run]``: each run feeds every model the same sample, in rotating order."""
    sessions = []
    try:
        for (label, _), path in zip(labelled, paths):
            try:
                sessions.append(Session(path, optimize=True, threads=threads))
                missing = [n for n in sessions[-1].input_names if n not in samples[0]]
                if missing:
                    raise InputError(f"needs inputs {missing} that the feeds lack "
                                     f"(the feeds hold {sorted(samples[0])}: models compared must share their inputs)")
                for feed in itertools.islice(itertools.cycle(samples), WARMUP_RUNS):
                    sessions[-1].run(feed)
            except InputError as exc:
                raise InputError(f"{label}: {exc}") from None
        own_feeds = [[{n: feed[n] for n in s.input_names if n in feed} for feed in samples] for s in sessions]
        times = np.empty((len(sessions), runs))
        order = list(range(len(sessions)))
        for run in range(runs):
            for k in _run_order(order, run):
                feed = own_feeds[k][run % len(samples)]
                start = time.perf_counter()
                sessions[k].session.run(None, feed)
                times[k, run] = time.perf_counter() - start
        return times
    finally:
        for session in sessions:
            session.close()


def _run_order(order: list[int], run: int) -> list[int]:
    """Rotated each run and reversed every other run: each model starts runs equally often and follows both
    neighbours equally often (a small model right after a big one finds its weights evicted from the cache)."""
    shift = (run // 2) % len(order)
    rotated = order[shift:] + order[:shift]
    return rotated if run % 2 == 0 else rotated[::-1]


def _summary(label: str, size: int, seconds: np.ndarray, peak: int | None) -> ModelTiming:
    p10, median, p90 = (float(v) * 1000 for v in np.percentile(seconds, [10, 50, 90]))
    return ModelTiming(label, size, median, p10, p90, (p90 - p10) / median if median else 0.0,
                       len(seconds) / float(seconds.sum()), peak)


def _peak_memory(path: Path, feed: Feed, threads: int, scratch: Path) -> int | None:
    """Peak RSS increase of a fresh Python opening ``path`` and running ``feed`` (None where unmeasurable).

    A plain subprocess, not multiprocessing: spawning would re-run the caller's main script.
    """
    feed_file = scratch / "peak-feed.npz"
    np.savez(feed_file, **feed)
    command = [sys.executable, "-c", "import sys; from onnxopt.benchmark import _session_peak; "
               "print(_session_peak(sys.argv[1], sys.argv[2], int(sys.argv[3])))", str(path), str(feed_file), str(threads)]
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.SubprocessError):  # no subprocesses here: the other figures stand on their own
        return None
    answer = done.stdout.split()[-1] if done.returncode == 0 and done.stdout.split() else "None"
    return None if answer == "None" else int(answer)


def _session_peak(path: str, feed_file: str, threads: int) -> int | None:
    """Runs in the fresh process: the peak RSS (Linux VmHWM, reset first) above the RSS before the session."""
    with np.load(feed_file) as arrays:
        feed = {name: arrays[name] for name in arrays.files}
    if not _reset_peak():
        return None
    before = _status_kib("VmRSS")
    with Session(path, optimize=True, threads=threads) as session:
        session.run(feed)
        peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0) * 1024


def _reset_peak() -> bool:
    """Sets the process's peak RSS to its current RSS (Linux >= 4.0), so imports do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_benchmark(bench: Benchmark) -> str:
    """The terminal table: one row per model, ratios to the first model at the right."""
    width = max(12, *(len(m.label) for m in bench.models))
    header = (f"{'model':<{width}} {'size':>10} {'median ms':>10} {'p90 ms':>9} {'spread':>7} {'runs/s':>9} "
              f"{'peak mem':>10}   {'latency':>7} {'size':>6} {'memory':>6}")
    rows = [f"onnxruntime {bench.onnxruntime} CPU, {bench.threads} thread(s), {bench.runs} runs per model interleaved; "
            f"feeds: {bench.feeds['origin']} ({bench.feeds['samples']} samples)"
            + "".join(f"; {note}" for note in bench.feeds.get("notes", [])), header, "-" * len(header)]
    for m in bench.models:
        memory = "-" if m.peak_memory_bytes is None else human_bytes(m.peak_memory_bytes)
        ratio = {k: "-" if v is None else f"{v:.2f}x" for k, v in m.vs_first.items()}
        rows.append(f"{m.label:<{width}} {human_bytes(m.file_bytes):>10} {m.median_ms:>10.4g} {m.p90_ms:>9.4g} "
                    f"{m.spread:>7.1%} {m.throughput_per_s:>9.5g} {memory:>10}   {ratio['latency']:>7} "
                    f"{ratio['size']:>6} {ratio['memory']:>6}")
    rows.append("ratios to the first model: latency, the median of per-run ratios; size and peak memory, plain ratios")
    return "\n".join(rows)
