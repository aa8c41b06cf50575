"""Graph clean-up side by side: onnxopt vs onnx-simplifier vs onnxslim.

    python benchmarks/bench_cleanup.py [--pipeline "lift-constants,flush-subnormals,remove-noops,fold-constants,remove-noops,fold-batchnorm,fuse-bias,cse,dce"]
                                       [--runs 200] [--validate] [--no-wheel] [--keep DIR]
                                       [--rapidocr DIR] [--extra NAME=MODEL,EVAL ...]

The tools:

  onnxopt   ``onnxopt.optimize(path, PIPELINE, output=..., validate=False)`` (``--validate``: with
            onnxopt's own validation, on the model's data where there is some)
  onnxsim   ``onnx.load`` + ``onnxsim.simplify(model)`` + ``onnx.save``
  onnxslim  ``onnx.load`` + ``onnxslim.slim(model)`` + ``onnx.save``
  onnxsim-check  (with ``--validate``) ``onnxsim.simplify(model, check_n=1, test_input_shapes=...)``:
            onnxsim checking its result on one random input of the first eval sample's shapes, the
            peer of onnxopt's validation

The models: the shared models (``../shared/models``) and the samples, each with its eval data; with
``--rapidocr DIR`` (default: /tmp/rapidocr/rapidocr_onnxruntime/models, skipped when absent, from
``pip download --no-deps rapidocr-onnxruntime==1.4.4``) PaddleOCR's text detector and recognizer with
text-image feeds (``ocr_feeds.py``); ``--extra NAME=MODEL,EVAL`` adds any model with its feeds; and
every model shipped inside the installed wheels: onnx's backend test models
(``onnx/backend/test/data/{simple,pytorch-converted,pytorch-operator}/*/model.onnx`` with their
``test_data_set_*/input_*.pb``, and ``light/light_*.onnx``: the ``real/`` models' architectures with
ConstantOfShape weights, fed seeded random inputs of their declared shapes) and onnxruntime's
``datasets/*.onnx`` (random inputs).

Per model and tool: nodes of the main graph before/after (all, and without Constant nodes, since tools
differ in whether constants are nodes or initializers), initializers, file size, and the tool's time
(load + tool + save, timed inside the process, and the whole process with Python start and imports)
and memory. Shared models and samples run each tool in a fresh child process, started through
bench_core's launcher so its peak RSS is the tool's own (``os.wait4`` rusage); growth = peak during
the call minus RSS just before it. Wheel models run one child per tool over all of them (the peak is
reset per model through ``/proc/self/clear_refs``), restarted past a model that kills it.

Correctness: every result and the original run in onnxruntime (CPU, graph optimizations off, one
thread) on the eval data / test data / random feeds, in a child process (a model that crashes
onnxruntime is a result); max abs difference over all outputs and samples, relative to the largest
abs value of the original's output; above 1e-4 relative (or any difference in a non-float output)
is flagged as a mismatch. A tool raising an error is shown as failed with the first line of its message.
Latency (shared models and samples only): median onnxruntime latency (all graph optimizations, one
thread, first eval sample), every candidate timed round-robin over --runs rounds (bench_quantize's
``latencies_ms``), relative to the original.

Prints markdown tables and writes benchmarks/out/bench_cleanup.json (per wheel model detail there).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# bench_core imports numpy and onnx only, so the tool workers start lean (common and bench_quantize,
# which load onnxruntime and onnxopt, are imported where the parent needs them)
from bench_core import _failure_line, timed_child

PY = sys.executable
OUT_DIR = HERE / "out"
DEFAULT_PIPELINE = "lift-constants,flush-subnormals,remove-noops,fold-constants,remove-noops,fold-batchnorm,fuse-bias,cse,dce"
TOOLS = ("onnxopt", "onnxsim", "onnxslim")
CHECKING_TOOLS = ("onnxsim-check",)  # with --validate: the peers' own result checks
RAPIDOCR_DIR = Path("/tmp/rapidocr/rapidocr_onnxruntime/models")
RAPIDOCR = {"ppocr_det": "ch_PP-OCRv4_det_infer.onnx", "ppocr_rec": "ch_PP-OCRv4_rec_infer.onnx"}
REL_TOL = 1e-4
MARK = "@@bench_cleanup "  # result lines of the workers (tools print their own output too)
JOB_TIMEOUT_S = 300  # a worker silent this long on one job is killed; the job counts as timed out
MiB = 2**20


# --------------------------------------------------------------------------- models


def wheel_models() -> list[dict]:
    """Models shipped in installed wheels: {name, path, data: {kind, path}}."""
    import onnxruntime

    found = []
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    for group in ("simple", "pytorch-converted", "pytorch-operator"):
        for model in sorted((data / group).glob("*/model.onnx")):
            has_sets = any(model.parent.glob("test_data_set_*/input_*.pb"))
            found.append({"name": f"{group}/{model.parent.name}", "path": str(model),
                          "data": {"kind": "folder", "path": str(model.parent)} if has_sets else {"kind": "random"}})
    for model in sorted((data / "light").glob("*.onnx")):
        found.append({"name": f"light/{model.stem}", "path": str(model), "data": {"kind": "random"}})
    for model in sorted((Path(onnxruntime.__file__).parent / "datasets").glob("*.onnx")):
        found.append({"name": f"onnxruntime/datasets/{model.stem}", "path": str(model), "data": {"kind": "random"}})
    return found


def stats(model: onnx.ModelProto, path: Path) -> dict:
    """Main-graph node counts, initializers, and the file size (external data files included)."""
    nodes = model.graph.node
    constants = sum(1 for n in nodes if n.op_type == "Constant" and n.domain in ("", "ai.onnx"))
    size = path.stat().st_size
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    size += sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
    return {"nodes": len(nodes), "nodes_no_const": len(nodes) - constants,
            "initializers": len(model.graph.initializer), "inputs": len(model.graph.input), "bytes": size}


# --------------------------------------------------------------------------- workers (child processes)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Start VmHWM afresh at the current RSS (Linux >= 4.0), so each job's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def tool_worker(tool: str, jobs: list[dict]) -> None:
    """Run ``tool`` on each job's model (load + tool + save timed), one result line per job."""
    if tool == "onnxopt":
        import onnxopt

        def run(src: str, dst: str, job: dict) -> None:
            data = job.get("validate_data") if job.get("validate") else None
            result = onnxopt.optimize(src, job["pipeline"], output=dst, validate=bool(job.get("validate")),
                                      data=data)
            if not result.report.passed:
                raise RuntimeError(f"step failed: {result.report.failure}")
    elif tool in ("onnxsim", "onnxsim-check"):
        import onnxsim

        def run(src: str, dst: str, job: dict) -> None:
            checks = {}
            if tool == "onnxsim-check":  # its check needs fixed shapes: those of the first eval sample
                with np.load(job["validate_data"]) as data:
                    checks = {"check_n": 1, "test_input_shapes": {k: list(data[k].shape[1:]) for k in data.files}}
            model, ok = onnxsim.simplify(onnx.load(src), **checks)
            if not ok:
                raise RuntimeError("onnxsim's check failed")
            onnx.save(model, dst)
    elif tool == "onnxslim":
        import onnxslim

        def run(src: str, dst: str, job: dict) -> None:
            model = onnxslim.slim(onnx.load(src))
            onnx.save(model, dst)
    else:
        raise SystemExit(f"unknown tool {tool}")
    for job in jobs:
        rss_before = _proc_status_bytes("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        row: dict = {"i": job["i"]}
        try:
            run(job["src"], job["dst"], job)
            row["seconds"] = time.perf_counter() - start
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a tool failing is a result
            row["seconds"] = time.perf_counter() - start
            row["error"] = _first_line(exc)
        row["peak_rss_bytes"] = _proc_status_bytes("VmHWM")
        row["growth_bytes"] = max(0, row["peak_rss_bytes"] - rss_before)
        if "error" not in row:
            try:
                row.update(stats(onnx.load(job["dst"], load_external_data=False), Path(job["dst"])))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"output unreadable: {_first_line(exc)}"
        print(MARK + json.dumps(row), flush=True)


def _feeds(src: str, data: dict) -> list[dict]:
    from onnxopt.data import (
        load_feeds,
        model_inputs,
        name_positional_inputs,
        random_feeds,
    )

    model = onnx.load(src, load_external_data=False)
    if not model_inputs(model):
        return [{}]
    if data["kind"] == "random":
        feeds, _ = random_feeds(model, count=2, seed=0)
    else:
        feeds = name_positional_inputs(load_feeds(data["path"]), model)
    return [{k: np.asarray(v) for k, v in f.items()} for f in feeds]


def _leaves(value) -> list[np.ndarray]:
    """Arrays of an output: a tensor, or the elements of a sequence / map (ZipMap outputs)."""
    if isinstance(value, dict):
        return [a for k in sorted(value, key=str) for a in _leaves(value[k])]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _leaves(v)]
    return [np.asarray(value)]


def _difference(ref: list, got: list) -> tuple[float, float, str | None]:
    """Max abs difference and max relative (to the output's largest |value|) over all outputs."""
    if len(ref) != len(got):
        return float("inf"), float("inf"), f"{len(got)} outputs, original has {len(ref)}"
    max_abs = max_rel = 0.0
    for i, (r_out, g_out) in enumerate(zip(ref, got)):
        r_leaves, g_leaves = _leaves(r_out), _leaves(g_out)
        if len(r_leaves) != len(g_leaves):
            return float("inf"), float("inf"), f"output {i}: {len(g_leaves)} elements, original {len(r_leaves)}"
        for r, g in zip(r_leaves, g_leaves):
            if r.shape != g.shape:
                return float("inf"), float("inf"), f"output {i}: shape {g.shape}, original {r.shape}"
            if r.dtype.kind not in "fc" or g.dtype.kind not in "fc":
                if r.dtype != g.dtype or not np.array_equal(r, g):
                    return float("inf"), float("inf"), f"output {i} ({r.dtype}): values differ"
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            same = (r64 == g64) | (np.isnan(r64) & np.isnan(g64))
            diff = np.where(same, 0.0, np.abs(r64 - g64))
            abs_ = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
            finite = np.abs(r64[np.isfinite(r64)])
            scale = float(finite.max()) if finite.size else 0.0
            max_abs = max(max_abs, abs_)
            max_rel = max(max_rel, abs_ / scale if scale > 0 else (0.0 if abs_ == 0 else float("inf")))
    return max_abs, max_rel, None


def check_worker(jobs: list[dict]) -> None:
    """Each job: run the original (cached per source) and one candidate in onnxruntime, compare."""
    from common import session

    cache: dict[str, tuple] = {}

    def run_all(path: str, feeds: list[dict]) -> list[list]:
        s = session(Path(path), optimize=False)
        return [s.run(None, f) for f in feeds]

    for job in jobs:
        row: dict = {"i": job["i"]}
        if job["src"] not in cache:
            cache.clear()
            try:
                feeds = _feeds(job["src"], job["data"])
                cache[job["src"]] = (feeds, run_all(job["src"], feeds), None)
            except Exception as exc:  # noqa: BLE001
                cache[job["src"]] = (None, None, _first_line(exc))
        feeds, ref, ref_error = cache[job["src"]]
        if ref_error is not None:
            row.update(status="reference_failed", error=f"original: {ref_error}")
        elif job["candidate"] == job["src"]:
            row.update(status="ok", max_abs=0.0, max_rel=0.0, samples=len(feeds), outputs=len(ref[0]))
        else:
            try:
                got = run_all(job["candidate"], feeds)
            except Exception as exc:  # noqa: BLE001
                row.update(status="run_failed", error=_first_line(exc))
            else:
                worst_abs = worst_rel = 0.0
                note = None
                for r, g in zip(ref, got):
                    a, rel, note = _difference(r, g)
                    worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, rel)
                    if note:
                        break
                row.update(status="ok", max_abs=worst_abs, max_rel=worst_rel, samples=len(feeds),
                           outputs=len(ref[0]), note=note)
        print(MARK + json.dumps(row, default=float), flush=True)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_jobs(kind: str, jobs: list[dict], workdir: Path) -> list[dict]:
    """Run jobs in one worker child; if it dies (or hangs) on a job, that job is the result and a
    new worker takes the rest. Jobs get their index as ``i``."""
    jobs = [{**job, "i": i} for i, job in enumerate(jobs)]
    results: list[dict | None] = [None] * len(jobs)
    start = 0
    while start < len(jobs):
        spec = workdir / f"jobs-{kind.replace(':', '-')}-{start}.json"
        spec.write_text(json.dumps(jobs[start:]))
        log = workdir / f"log-{kind.replace(':', '-')}-{start}.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen([PY, __file__, "--_worker", kind, str(spec)], stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            timed_out = False
            while True:
                try:
                    line = lines.get(timeout=JOB_TIMEOUT_S)
                except queue.Empty:
                    proc.kill()
                    timed_out = True
                    break
                if line is None:
                    break
                if line.startswith(MARK):
                    row = json.loads(line[len(MARK):])
                    results[row["i"]] = row
            rc = proc.wait()
        missing = next((i for i in range(start, len(jobs)) if results[i] is None), None)
        if missing is None:
            break
        why = (f"timed out after {JOB_TIMEOUT_S} s" if timed_out else
               f"process died (exit {rc}): {_failure_line(log.read_text(errors='replace')[-2000:])}")
        results[missing] = {"i": missing, "error": why, "status": "crashed", "crashed": True}
        start = missing + 1
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- the two parts


def tool_job(tool: str, src: Path, dst: Path, pipeline: str, validate: bool, data: str | None) -> dict:
    job = {"src": str(src), "dst": str(dst)}
    if tool == "onnxopt":
        job.update(pipeline=pipeline, validate=validate, validate_data=data)
    elif tool in CHECKING_TOOLS:
        job.update(validate_data=data)
    return job


def main_models(args, workdir: Path) -> dict:
    """Shared models and samples: each tool in a fresh process, checks, latency."""
    from bench_quantize import latencies_ms
    from common import cases

    results = {}
    tools = TOOLS + (CHECKING_TOOLS if args.validate else ())
    found = [(n, m, e) for n, m, _c, e, _l in cases(args.models, args.samples)] + extra_cases(args, workdir)
    for name, model_path, eval_path in found:
        print(f"  {name}", flush=True)
        folder = workdir / name.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        rows = {"original": {**stats(onnx.load(model_path, load_external_data=False), model_path)}}
        outputs = {}
        for tool in tools:
            dst = folder / f"{tool}.onnx"
            spec = folder / f"job-{tool}.json"
            spec.write_text(json.dumps([{**tool_job(tool, model_path, dst, args.pipeline, args.validate,
                                                    str(eval_path)), "i": 0}]))
            child = timed_child([PY, __file__, "--_worker", f"tool:{tool}", str(spec)], folder / f"log-{tool}.txt")
            found = [line for line in child["log_tail"].splitlines() if line.startswith(MARK)]
            row = json.loads(found[-1][len(MARK):]) if found else {
                "error": _failure_line(child["log_tail"]) or f"exit code {child['rc']}"}
            row.pop("i", None)
            row.update(process_s=child["wall_s"], process_peak_rss_bytes=child["peak_rss_bytes"], rc=child["rc"])
            rows[tool] = row
            if "error" not in row:
                outputs[tool] = dst
        checks = run_jobs("check", [{"src": str(model_path), "candidate": str(p),
                                     "data": {"kind": "npz", "path": str(eval_path)}}
                                    for p in [model_path, *outputs.values()]], folder)
        for key, check in zip(["original", *outputs], checks):
            check.pop("i", None)
            rows[key]["check"] = check
        timed = {k: p for k, p in {"original": model_path, **outputs}.items() if rows[k]["check"].get("status") == "ok"}
        if timed:
            from onnxopt.data import load_feeds

            feed0 = {k: np.asarray(v) for k, v in next(iter(load_feeds(eval_path))).items()}
            for key, ms in latencies_ms(timed, feed0, args.runs).items():
                rows[key]["latency_ms"] = ms
        results[name] = rows
    return results


def extra_cases(args, workdir: Path) -> list[tuple[str, Path, Path]]:
    """(name, model, eval feeds) of the rapidocr models when present, and of every --extra."""
    found = []
    if all((args.rapidocr / f).is_file() for f in RAPIDOCR.values()):
        from ocr_feeds import write_feeds

        feeds = write_feeds(workdir / "ocr-feeds")
        found += [(name, args.rapidocr / f, path) for (name, f), path in zip(RAPIDOCR.items(), feeds)]
    else:
        print(f"  (no rapidocr models in {args.rapidocr}: skipped)", flush=True)
    for spec in args.extra:
        name, _, paths = spec.partition("=")
        model, _, feeds = paths.partition(",")
        if Path(model).is_file() and Path(feeds).is_file():
            found.append((name, Path(model), Path(feeds)))
        else:
            print(f"  (--extra {spec}: model or feeds missing: skipped)", flush=True)
    return found


def print_validation_ratios(results: dict) -> None:
    """onnxopt with validation against the peers, per model: wall time and peak RSS ratios."""
    print("\n### onnxopt (with validation) against its peers, same run\n")
    print("| model | onnxopt s | onnxsim s | onnxsim-check s | onnxslim s | onnxopt / onnxsim-check time "
          "| onnxopt / onnxsim time | onnxopt peak RSS MiB | onnxsim-check peak RSS MiB | RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        def cell(tool, key="seconds", scale=1.0, rows=rows):
            r = rows.get(tool, {})
            return None if "error" in r or key not in r else r[key] / scale

        ours, sim, check, slim = (cell(t) for t in ("onnxopt", "onnxsim", "onnxsim-check", "onnxslim"))
        rss, rss_check = cell("onnxopt", "process_peak_rss_bytes", MiB), cell("onnxsim-check", "process_peak_rss_bytes", MiB)

        def fmt(v, pattern="{:.2f}"):
            return "failed" if v is None else pattern.format(v)

        def ratio(a, b):
            return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"

        print(f"| {name} | {fmt(ours)} | {fmt(sim)} | {fmt(check)} | {fmt(slim)} | {ratio(ours, check)} | "
              f"{ratio(ours, sim)} | {fmt(rss, '{:.0f}')} | {fmt(rss_check, '{:.0f}')} | {ratio(rss, rss_check)} |")
    sys.stdout.flush()


def wheel_part(args, workdir: Path) -> dict:
    """Every wheel model through every tool (one worker per tool), then one check worker."""
    models = wheel_models()
    out = workdir / "wheel"
    out.mkdir(parents=True, exist_ok=True)
    detail: dict = {}
    for m in models:
        try:
            original = stats(onnx.load(m["path"], load_external_data=False), Path(m["path"]))
        except Exception as exc:  # noqa: BLE001
            original = {"error": _first_line(exc)}
        detail[m["name"]] = {"path": m["path"], "data": m["data"]["kind"], "original": original}
    tool_walls = {}
    for tool in TOOLS:
        print(f"  {tool} on {len(models)} wheel models", flush=True)
        start = time.perf_counter()
        jobs = []
        for k, m in enumerate(models):
            data = m["data"].get("path")
            jobs.append(tool_job(tool, Path(m["path"]), out / f"{k}-{tool}.onnx", args.pipeline, args.validate, data))
        for m, row in zip(models, run_jobs(f"tool:{tool}", jobs, workdir)):
            row.pop("i", None)
            detail[m["name"]][tool] = row
        tool_walls[tool] = time.perf_counter() - start
    print("  checking in onnxruntime", flush=True)
    check_jobs, keys = [], []
    for k, m in enumerate(models):
        candidates = {"original": m["path"]}
        candidates.update({t: str(out / f"{k}-{t}.onnx") for t in TOOLS if "error" not in detail[m["name"]][t]})
        for key, path in candidates.items():
            check_jobs.append({"src": m["path"], "candidate": path, "data": m["data"]})
            keys.append((m["name"], key))
    for (name, key), check in zip(keys, run_jobs("check", check_jobs, workdir)):
        check.pop("i", None)
        detail[name][key]["check"] = check
    return {"models": detail, "worker_wall_s": tool_walls}


def matches(row: dict) -> bool | None:
    """True / False whether outputs match the original; None when it cannot be said."""
    check = row.get("check", {})
    if check.get("status") == "reference_failed":
        return None
    if check.get("status") != "ok":
        return False
    return check.get("note") is None and check["max_rel"] <= REL_TOL


def wheel_summary(detail: dict, prefix: str = "") -> dict:
    """Totals over the wheel models whose name starts with ``prefix``."""
    models = {n: d for n, d in detail["models"].items() if n.startswith(prefix)}
    comparable = [n for n, d in models.items() if d["original"].get("nodes") is not None
                  and d["original"].get("check", {}).get("status") == "ok"]
    processed_by_all = [n for n, d in models.items()
                        if "nodes" in d["original"] and all("error" not in d[t] for t in TOOLS)]
    summary = {"models": len(models), "original_runs_in_ort": len(comparable),
               "processed_by_all_tools": len(processed_by_all), "tools": {}}
    for tool in TOOLS:
        ok = [n for n in models if "error" not in models[n][tool] and "nodes" in models[n]["original"]]
        match = [n for n in ok if matches(models[n][tool]) is True]
        mismatch = [n for n in ok if matches(models[n][tool]) is False]
        errors = Counter(models[n][tool]["error"] for n in models if "error" in models[n][tool])

        def total(names, key, side, tool=tool):
            return sum(models[n][side if side == "original" else tool][key] for n in names)

        summary["tools"][tool] = {
            "processed": len(ok), "match": len(match), "mismatch_or_unrunnable": len(mismatch),
            "not_comparable": len(ok) - len(match) - len(mismatch),
            **{f"{k}_{side}": total(ok, k, "original" if side == "before" else tool)
               for k in ("nodes", "nodes_no_const", "initializers", "inputs", "bytes") for side in ("before", "after")},
            **{f"common_{k}_after": total(processed_by_all, k, tool)
               for k in ("nodes", "nodes_no_const", "initializers", "inputs", "bytes")},
            "tool_seconds": sum(models[n][tool].get("seconds", 0.0) for n in models),
            "max_peak_rss_bytes": max((models[n][tool].get("peak_rss_bytes", 0) for n in models), default=0),
            "max_growth_bytes": max((models[n][tool].get("growth_bytes", 0) for n in models), default=0),
            "mismatches": {n: models[n][tool]["check"] for n in mismatch},
            "errors": {msg: [n for n in models if models[n][tool].get("error") == msg] for msg in errors},
        }
    summary["common_before"] = {k: sum(models[n]["original"][k] for n in processed_by_all)
                                for k in ("nodes", "nodes_no_const", "initializers", "inputs", "bytes")}
    return summary


# --------------------------------------------------------------------------- tables


def _correct_cell(row: dict) -> str:
    check = row.get("check", {})
    status = check.get("status")
    if status == "reference_failed":
        return f"n/a ({check.get('error')})"
    if status != "ok":
        return f"**does not run in onnxruntime**: {check.get('error')}"
    text = f"{check['max_abs']:.1e} ({check['max_rel']:.1e})"
    if check.get("note") or check["max_rel"] > REL_TOL:
        return f"**MISMATCH** {text}" + (f": {check['note']}" if check.get("note") else "")
    return text


def print_main(results: dict, pipeline: str) -> None:
    print(f"\nonnxopt pipeline: `{pipeline}`. Time: load + tool + save inside the process (whole process with "
          f"Python start and imports); peak RSS of that process (growth during the call). Latency: median "
          f"onnxruntime latency, all optimizations, 1 thread, round-robin. Max abs diff vs the original in "
          f"onnxruntime (optimizations off) over all outputs and eval samples (relative to the largest |output|; "
          f"> {REL_TOL:g} flagged).")
    for name, rows in results.items():
        orig = rows["original"]
        print(f"\n### {name}\n")
        print("| tool | nodes | nodes w/o Constant | initializers | size KiB | time s (process s) "
              "| peak RSS MiB (growth) | latency ms (x original) | max abs diff (rel) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for key, r in rows.items():
            if "error" in r:
                print(f"| {key} | failed: {r['error']} ||||||||")
                continue
            lat = r.get("latency_ms")
            lat_cell = "—" if lat is None else (f"{lat:.3f}" if key == "original"
                                                 else f"{lat:.3f} ({lat / orig['latency_ms']:.2f})")
            time_cell = "—" if key == "original" else f"{r['seconds']:.2f} ({r['process_s']:.2f})"
            rss_cell = ("—" if key == "original" else
                        f"{r['process_peak_rss_bytes'] / MiB:.0f} ({r['growth_bytes'] / MiB:.1f})")
            print(f"| {key} | {r['nodes']} | {r['nodes_no_const']} | {r['initializers']} | {r['bytes'] / 1024:.0f} | "
                  f"{time_cell} | {rss_cell} | {lat_cell} | {_correct_cell(r) if key != 'original' else '—'} |")
    sys.stdout.flush()


def print_wheel(summary: dict, groups: dict, walls: dict) -> None:
    s = summary
    print(f"\n### wheel models ({s['models']}: onnx backend test models and onnxruntime datasets; "
          f"{s['original_runs_in_ort']} of the originals run in onnxruntime on their inputs)\n")
    print("| tool | processed without error | outputs match (of those comparable) | mismatch or result does not run "
          "| nodes before → after (models it processed) | w/o Constant before → after "
          "| tool s total (worker wall s) | max peak RSS MiB (max growth) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tool, t in s["tools"].items():
        comparable = t["match"] + t["mismatch_or_unrunnable"]
        flag = f"**{t['mismatch_or_unrunnable']}**" if t["mismatch_or_unrunnable"] else "0"
        print(f"| {tool} | {t['processed']} / {s['models']} | {t['match']} / {comparable} | {flag} | "
              f"{t['nodes_before']} → {t['nodes_after']} | {t['nodes_no_const_before']} → {t['nodes_no_const_after']} | "
              f"{t['tool_seconds']:.1f} ({walls[tool]:.1f}) | "
              f"{t['max_peak_rss_bytes'] / MiB:.0f} ({t['max_growth_bytes'] / MiB:.0f}) |")
    keys = ("nodes", "nodes_no_const", "initializers", "inputs", "bytes")

    def cell(totals: dict) -> str:
        return " / ".join(f"{totals[k] / 1024:.0f}" if k == "bytes" else str(totals[k]) for k in keys)

    c = s["common_before"]
    print(f"\nOn the {s['processed_by_all_tools']} models every tool processed (totals): nodes / w/o Constant / "
          f"initializers / graph inputs / KiB\n")
    print("| tool | nodes / w/o Constant / initializers / graph inputs / KiB |")
    print("|---|---:|")
    print(f"| original | {cell(c)} |")
    for tool, t in s["tools"].items():
        print(f"| {tool} | {cell({k: t[f'common_{k}_after'] for k in keys})} |")
    print("\nBy group, each tool on the models it processed: processed, outputs match / comparable, "
          "nodes before → after, KiB before → after\n")
    print("| group | models (original runs in onnxruntime) | " + " | ".join(TOOLS) + " |")
    print("|---|---:|" + "---|" * len(TOOLS))
    for prefix, g in groups.items():
        cells = []
        for tool in TOOLS:
            t = g["tools"][tool]
            cells.append(f"{t['processed']}, {t['match']}/{t['match'] + t['mismatch_or_unrunnable']}; "
                         f"{t['nodes_before']} → {t['nodes_after']}; "
                         f"{t['bytes_before'] / 1024:.0f} → {t['bytes_after'] / 1024:.0f}")
        print(f"| {prefix.rstrip('/')} | {g['models']} ({g['original_runs_in_ort']}) | " + " | ".join(cells) + " |")
    for tool, t in s["tools"].items():
        if t["errors"]:
            print(f"\n{tool} failures:\n")
            for msg, names in sorted(t["errors"].items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(names[:4]) + (f", … ({len(names)} models)" if len(names) > 4 else "")
                print(f"- `{msg[:200]}`: {shown}")
        if t["mismatches"]:
            print(f"\n{tool} results that differ from the original or do not run:\n")
            for name, check in t["mismatches"].items():
                if check.get("status") == "ok":
                    print(f"- {name}: max abs {check['max_abs']:.2e}, rel {check['max_rel']:.2e}"
                          + (f" ({check['note']})" if check.get("note") else ""))
                else:
                    print(f"- {name}: {check.get('status')}: {check.get('error')}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"onnxopt pipeline (default {DEFAULT_PIPELINE})")
    parser.add_argument("--runs", type=int, default=200, help="latency rounds (one run per candidate each)")
    parser.add_argument("--validate", action="store_true", help="run onnxopt with its own validation")
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--samples", type=Path, default=ROOT / "samples")
    parser.add_argument("--no-wheel", action="store_true", help="skip the models shipped in wheels")
    parser.add_argument("--keep", type=Path, help="write the tools' outputs here and keep them")
    parser.add_argument("--rapidocr", type=Path, default=RAPIDOCR_DIR, help="folder with rapidocr's det/rec models")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=MODEL,EVAL",
                        help="another model and its eval feeds (.npz), skipped when absent (repeatable)")
    parser.add_argument("--_worker", nargs=2, metavar=("KIND", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        kind, spec = args._worker
        jobs = json.loads(Path(spec).read_text())
        if kind == "check":
            check_worker(jobs)
        else:
            tool_worker(kind.split(":", 1)[1], jobs)
        return

    import onnxruntime
    import onnxsim
    import onnxslim

    start = time.perf_counter()
    results: dict = {"pipeline": args.pipeline, "validate": args.validate, "rel_tol": REL_TOL,
                     "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                  "onnxsim": onnxsim.__version__, "onnxslim": onnxslim.__version__,
                                  "python": sys.version.split()[0]}, "cpus": os.cpu_count()}
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-cleanup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print("shared models and samples (a fresh process per tool and model)", flush=True)
        results["main"] = main_models(args, workdir)
        print_main(results["main"], args.pipeline)
        if args.validate:
            print_validation_ratios(results["main"])
        if not args.no_wheel:
            print("\nmodels shipped in wheels", flush=True)
            detail = wheel_part(args, workdir)
            groups = {p: wheel_summary(detail, p) for p in
                      ("simple/", "pytorch-converted/", "pytorch-operator/", "light/", "onnxruntime/")}
            results["wheel"] = {**detail, "summary": wheel_summary(detail), "groups": groups}
            print_wheel(results["wheel"]["summary"], groups, detail["worker_wall_s"])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - start
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "bench_cleanup.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwrote {OUT_DIR / 'bench_cleanup.json'} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
