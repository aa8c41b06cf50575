"""Core benchmark (a script, not a test): dce scaling, and ``optimize -p dce`` on a big external-data model.

Part 1 times the ``dce`` pass alone (best of 3) on generated graphs of 10k and 100k nodes (a long
Add/Relu chain with dead side branches and per-node initializers); its time must grow linearly
(ratio 100k/10k <= 12). The verdict uses process CPU time, which leaves out time lost to other
processes on a shared machine (the wall-time ratio is printed too), and a bare node walk on the same
graphs shows how much of the ratio the memory hierarchy alone accounts for.

Part 2 writes a model of ``--size-gb`` (default 1.0) with external data (an MLP of 4096x4096
float32 MatMul weights plus a dead branch with its own big weight), then runs each tool in its
own subprocess and records wall time and that process's peak RSS (``os.wait4`` rusage of the tool,
taken by a bare launcher process; a psutil-sampled peak is kept as a cross-check):

  bare        ``onnx.load`` + ``onnx.save_model(save_as_external_data=True)``
  onnxopt     ``onnxopt optimize big.onnx -o out.onnx -p dce --no-validate``
  onnxopt+val ``onnxopt optimize big.onnx -o out.onnx -p dce`` (random feeds)
  onnxsim     ``onnxsim big.onnx out.onnx --save-as-external-data``
  onnxslim    ``onnxslim big.onnx out.onnx --save-as-external-data``
  with ``--prune``: ``onnxopt optimize big.onnx -o out.onnx -p "prune(sparsity=0.5)"`` with
              ``--no-validate`` and with validation (``--min-cosine 0``, so that the 38 pruned layers'
              drift does not stop the write: the timing covers the whole validated run)
  with ``--baseline DIR`` also: the same validated prune run by the onnxopt checkout in DIR (say, the
              commit before a change), for a before/after in the same run

Each output is then checked in another subprocess: onnxruntime runs it and the input on one random
feed (outputs must agree within 1e-4), and its node count is compared with the live node count.
Targets: onnxopt --no-validate <= 1.5x the bare load+save time and peak RSS <= 1.3x the model's
size; with validation peak RSS <= 2.2x; prune with validation: peak RSS <= 1.3x the model's size and
wall <= 1.5x bare (issue 11). Results go to benchmarks/out/core.json.

    python benchmarks/bench_core.py [--size-gb 1.0] [--skip-peers] [--prune] [--baseline DIR] [--keep] [--workdir DIR]

The model is written just before the runs, so its files are in the page cache for every tool; the
disk is synced before each run, so no tool waits for the previous one's writes. onnxopt syncs what it
writes before it returns (an output is complete once it exists); the bare ``onnx.save`` does not.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
PY = sys.executable
BIN = Path(PY).parent
GiB = 2**30
HIDDEN = 4096
OPSET = 17

TARGETS = {"time_vs_bare_no_validate": 1.5, "rss_vs_size_no_validate": 1.3, "rss_vs_size_validate": 2.2,
           "dce_ratio_100k_10k": 12.0, "prune_rss_vs_size_validate": 1.3, "prune_time_vs_bare_validate": 1.5}


# --------------------------------------------------------------------------- part 1: dce scaling


def chain_model(n_nodes: int) -> onnx.ModelProto:
    """About ``n_nodes`` nodes: Add(+init)/Relu pairs along a chain; every 5th pair has a dead
    Mul(+init)/Relu side branch (its initializer dies with it)."""
    nodes, inits = [], []
    h = "x"
    i = 0
    while len(nodes) < n_nodes:
        c = f"c{i}"
        inits.append(numpy_helper.from_array(np.array([0.001], dtype=np.float32), c))
        nodes.append(helper.make_node("Add", [h, c], [f"a{i}"], name=f"add{i}"))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
        if i % 5 == 0:
            d = f"d{i}"
            inits.append(numpy_helper.from_array(np.array([2.0], dtype=np.float32), d))
            nodes.append(helper.make_node("Mul", [f"a{i}", d], [f"m{i}"], name=f"dmul{i}"))
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"dr{i}"], name=f"drelu{i}"))
        h = f"r{i}"
        i += 1
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _walk(model: onnx.ModelProto) -> dict:
    """The least any pass does: visit every node once and index its outputs (a scaling floor)."""
    producer = {}
    for i, node in enumerate(model.graph.node):
        for out in node.output:
            producer[out] = i
    return producer


def _best(fn, model: onnx.ModelProto, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of each run (CPU time leaves out time lost to other processes)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(copy)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - start)
        del copy
    return walls, cpus, result


def bench_dce(sizes=(10_000, 100_000), repeats: int = 3) -> dict:
    """Best of ``repeats`` for the dce pass alone (gc enabled, as in the CLI), and for a bare node
    walk on the same graphs: its ratio shows what the machine's caches alone cost at 10x the size."""
    from onnxopt.passes.dce import DeadCodeElimination

    results = {}
    for n in sizes:
        model = chain_model(n)
        walls, cpus, result = _best(lambda m: DeadCodeElimination()(m), model, repeats)
        walk_walls, walk_cpus, _ = _best(_walk, model, repeats)
        results[n] = {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
                      "best_s": min(walls), "walls_s": walls, "best_cpu_s": min(cpus), "cpus_s": cpus,
                      "stats": dict(result.stats), "walk_best_s": min(walk_walls),
                      "walk_best_cpu_s": min(walk_cpus)}
        del model, result
    small, big = sizes
    ratio = results[big]["best_cpu_s"] / results[small]["best_cpu_s"]
    wall_ratio = results[big]["best_s"] / results[small]["best_s"]
    walk_ratio = results[big]["walk_best_cpu_s"] / results[small]["walk_best_cpu_s"]
    return {"sizes": {str(k): v for k, v in results.items()}, "ratio": ratio, "wall_ratio": wall_ratio,
            "walk_ratio": walk_ratio,
            "size_ratio": big / small, "target": TARGETS["dce_ratio_100k_10k"],
            "ok": ratio <= TARGETS["dce_ratio_100k_10k"]}


# --------------------------------------------------------------------------- part 2: big model


def write_big_model(folder: Path, size_gb: float, seed: int = 0) -> dict:
    """An MLP h = Relu(h @ W_i + b_i) with 4096x4096 float32 weights streamed into big.onnx.data,
    plus a dead branch (MatMul with its own 4096x4096 weight, then Relu) that reaches no output."""
    # imported here, not at the top: the "--_worker bare" baseline process stays onnx alone
    from onnxopt.tensors import set_external_location

    rng = np.random.default_rng(seed)
    weight_bytes = HIDDEN * HIDDEN * 4
    n_layers = max(1, math.ceil(size_gb * GiB / weight_bytes) - 1)  # one more weight is the dead branch
    data_name = "big.onnx.data"
    nodes, inits = [], []
    offset = 0
    scale = math.sqrt(2.0 / HIDDEN)

    def add_weight(f, name: str) -> None:
        nonlocal offset
        w = (rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32) * np.float32(scale))
        f.write(w.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[HIDDEN, HIDDEN])
        t.data_location = TensorProto.EXTERNAL
        set_external_location(t, data_name, offset, weight_bytes)
        offset += weight_bytes
        inits.append(t)

    h = "x"
    with open(folder / data_name, "wb") as f:
        for i in range(n_layers):
            add_weight(f, f"W{i}")
            inits.append(numpy_helper.from_array(
                (rng.standard_normal(HIDDEN, dtype=np.float32) * np.float32(0.01)), f"b{i}"))
            nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"ad{i}"], name=f"add{i}"))
            nodes.append(helper.make_node("Relu", [f"ad{i}"], [f"h{i}"], name=f"relu{i}"))
            h = f"h{i}"
            if i == n_layers // 2:
                add_weight(f, "W_dead")
                nodes.append(helper.make_node("MatMul", [h, "W_dead"], ["dead_mm"], name="dead_matmul"))
                nodes.append(helper.make_node("Relu", ["dead_mm"], ["dead_out"], name="dead_relu"))
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)
    size = path.stat().st_size + (folder / data_name).stat().st_size
    return {"path": str(path), "bytes": size, "gib": size / GiB, "nodes": len(nodes),
            "live_nodes": len(nodes) - 2, "layers": n_layers}


# A tiny launcher runs each tool and reports that tool's own rusage. Linux copies the hiwater RSS
# of the exec'ing process's old address space into the new program's ru_maxrss (exec_mmap ->
# setmax_mm_hiwater_rss; with vfork that is the parent's), so a tool started straight from this
# (big) process would report at least our own peak. The launcher's old address space is a bare
# interpreter (~10 MB), so the figure is the tool's.
LAUNCHER = r"""
import json, os, subprocess, sys, time
argv, log, env = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
with open(log, "wb") as out:
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "rc": os.waitstatus_to_exitcode(status),
                  "maxrss_kib": usage.ru_maxrss}))
"""


def timed_child(argv: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run argv through the launcher (``env``: variables set for the tool): wall time and the tool's own
    peak RSS (rusage of that process, maxrss in KiB on Linux), plus an independent psutil-sampled peak of
    its process tree (every 20 ms)."""
    import psutil

    launcher = subprocess.Popen([PY, "-S", "-c", LAUNCHER, json.dumps(argv), str(log), json.dumps(env or {})],
                                stdout=subprocess.PIPE, text=True)
    sampled = 0
    parent = psutil.Process(launcher.pid)
    while launcher.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in parent.children(recursive=True))
            sampled = max(sampled, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    report = json.loads(launcher.stdout.read().strip().splitlines()[-1])
    text = log.read_text(errors="replace")
    return {"argv": argv, "rc": report["rc"], "wall_s": report["wall_s"],
            "peak_rss_bytes": report["maxrss_kib"] * 1024, "sampled_peak_rss_bytes": sampled,
            "log_tail": text[-2000:]}


def bare_worker(src: str, dst: str) -> None:
    model = onnx.load(src)
    onnx.save_model(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(dst).name + ".data", size_threshold=1024)


def check_worker(src: str, dst: str) -> None:
    """Both models through onnxruntime on one random feed; node count of the output. Prints JSON."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    feed = {"x": np.random.default_rng(1).standard_normal((1, HIDDEN), dtype=np.float32)}
    outputs = []
    for path in (src, dst):
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feed)[0])
        del session
    skeleton = onnx.load(dst, load_external_data=False)
    pruned = onnx.load(dst)  # only the check reads the whole result
    weights = [numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name.startswith("W")]
    sparsity = round(sum(int(w.size - np.count_nonzero(w)) for w in weights) / sum(w.size for w in weights), 4)
    del pruned, weights
    ref, got = outputs
    max_abs = float(np.abs(ref - got).max())
    close = bool(np.allclose(got, ref, rtol=1e-4, atol=1e-5))
    print(json.dumps({"nodes": len(skeleton.graph.node),
                      "ops": sorted({n.op_type for n in skeleton.graph.node}),
                      "initializers": len(skeleton.graph.initializer),
                      "has_dead_weight": any(t.name == "W_dead" for t in skeleton.graph.initializer),
                      "max_abs": max_abs, "outputs_match": close, "sparsity": sparsity}))


PRUNE = "prune(sparsity=0.5)"


def run_tools(folder: Path, model: dict, skip_peers: bool, keep: bool, repeats: int = 1,
              prune: bool = False, baseline: str | None = None) -> list[dict]:
    src = model["path"]
    onnxopt = str(BIN / "onnxopt")
    envs = {}  # tool name -> variables for its process
    tools = [
        ("bare onnx.load+save", lambda out: [PY, __file__, "--_worker", "bare", src, out]),
        ("onnxopt -p dce --no-validate", lambda out: [onnxopt, "optimize", src, "-o", out, "-p", "dce", "--no-validate"]),
        ("onnxopt -p dce (validate)", lambda out: [onnxopt, "optimize", src, "-o", out, "-p", "dce"]),
    ]
    if prune:  # lossy: the gate is relaxed so that the run does all its work and writes its result
        tools += [
            (f"onnxopt -p {PRUNE} --no-validate", lambda out: [onnxopt, "optimize", src, "-o", out, "-p", PRUNE,
                                                              "--no-validate"]),
            (f"onnxopt -p {PRUNE} (validate)", lambda out: [onnxopt, "optimize", src, "-o", out, "-p", PRUNE,
                                                           "--min-cosine", "0"]),
        ]
        if baseline:
            name = f"baseline {Path(baseline).name}: onnxopt -p {PRUNE} (validate)"
            envs[name] = {"PYTHONPATH": str(Path(baseline).resolve()), "PYTHONSAFEPATH": "1"}  # not ./onnxopt
            tools.append((name, lambda out: [PY, "-m", "onnxopt", "optimize", src, "-o", out, "-p", PRUNE,
                                             "--min-cosine", "0"]))
    if not skip_peers:
        tools += [
            ("onnxsim", lambda out: [str(BIN / "onnxsim"), src, out, "--save-as-external-data"]),
            ("onnxslim", lambda out: [str(BIN / "onnxslim"), src, out, "--save-as-external-data"]),
        ]
    rows = []
    for i, (name, make_argv) in enumerate(tools):
        out_dir = folder / f"out{i}"
        out_dir.mkdir(exist_ok=True)
        out = str(out_dir / "out.onnx")
        print(f"  running {name} ...", flush=True)
        runs = []
        for _ in range(repeats):
            os.sync()  # each tool starts with nothing of the previous one's output still waiting to reach the disk
            runs.append(timed_child(make_argv(out), folder / f"log{i}.txt", envs.get(name)))
        row = {"tool": name, **min(runs, key=lambda r: (r["rc"] != 0, r["wall_s"])),
               "walls_s": [r["wall_s"] for r in runs]}
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
        row["sampled_peak_rss_bytes"] = max(r["sampled_peak_rss_bytes"] for r in runs)
        if row["rc"] == 0 and Path(out).is_file():
            check = subprocess.run([PY, __file__, "--_worker", "check", src, out], capture_output=True, text=True)
            if check.returncode == 0:
                row["check"] = json.loads(check.stdout.strip().splitlines()[-1])
                c = row["check"]
                if i == 0:  # bare load+save: an unchanged copy
                    row["correct"] = c["outputs_match"] and c["nodes"] == model["nodes"]
                elif PRUNE in name:  # lossy: it runs, and every MatMul weight is half zeros
                    row["correct"] = math.isfinite(c["max_abs"]) and c["sparsity"] == 0.5
                else:  # an optimizer: the dead branch and its weight must be gone
                    row["correct"] = (c["outputs_match"] and c["nodes"] <= model["live_nodes"]
                                      and not c["has_dead_weight"])
            else:
                row["check"] = {"error": (check.stderr or check.stdout).strip()[-1500:]}
                row["correct"] = False
            row["output_bytes"] = sum(p.stat().st_size for p in out_dir.iterdir())
        else:
            row["correct"] = False
            row["failure"] = _failure_line(row["log_tail"]) or f"exit code {row['rc']}, no output"
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        row["peak_rss_gib"] = row["peak_rss_bytes"] / GiB
        row["rss_vs_size"] = row["peak_rss_bytes"] / model["bytes"]
        rows.append(row)
        print(f"    {row['wall_s']:.2f} s, peak RSS {row['peak_rss_gib']:.2f} GiB, rc {row['rc']}, "
              f"correct {row['correct']}", flush=True)
    bare = rows[0]["wall_s"]
    for row in rows:
        row["time_vs_bare"] = row["wall_s"] / bare
    return rows


def _failure_line(log: str) -> str:
    lines = [line.strip() for line in log.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Killed" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def verdicts(rows: list[dict]) -> dict:
    by = {r["tool"]: r for r in rows}
    nv, v = by["onnxopt -p dce --no-validate"], by["onnxopt -p dce (validate)"]
    checks = {
        "time_vs_bare_no_validate": nv["time_vs_bare"],
        "rss_vs_size_no_validate": nv["rss_vs_size"],
        "rss_vs_size_validate": v["rss_vs_size"],
    }
    if f"onnxopt -p {PRUNE} (validate)" in by:  # issue 11: prune with validation on a multi-GB model
        pv = by[f"onnxopt -p {PRUNE} (validate)"]
        checks |= {"prune_rss_vs_size_validate": pv["rss_vs_size"], "prune_time_vs_bare_validate": pv["time_vs_bare"]}
    return {k: {"value": val, "target": TARGETS[k], "ok": val <= TARGETS[k]} for k, val in checks.items()}


def table(rows: list[dict]) -> str:
    lines = ["| tool | wall s | peak RSS GiB | RSS / model size | time / bare load+save | sampled RSS GiB | correct |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["rc"] == 0:
            c = r.get("check", {})
            detail = (f"yes ({c['nodes']} nodes, max abs {c['max_abs']:.1e})" if r["correct"]
                      else f"no: {c.get('error') or c}")
        else:
            detail = f"FAILED (rc {r['rc']}): {r.get('failure', '')}"
        lines.append(f"| {r['tool']} | {r['wall_s']:.2f} | {r['peak_rss_gib']:.2f} | {r['rss_vs_size']:.2f} | "
                     f"{r['time_vs_bare']:.2f} | {r['sampled_peak_rss_bytes'] / GiB:.2f} | {detail} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="model size in GiB (default 1.0)")
    parser.add_argument("--skip-peers", action="store_true", help="skip onnxsim and onnxslim")
    parser.add_argument("--keep", action="store_true", help="keep the generated model and the outputs")
    parser.add_argument("--workdir", help="where to write the big model (default: a new folder in $TMPDIR)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per tool: best wall time, highest peak RSS (default 1)")
    parser.add_argument("--reuse", action="store_true", help="reuse big.onnx already in --workdir (with --keep)")
    parser.add_argument("--skip-dce", action="store_true", help="skip part 1")
    parser.add_argument("--skip-big", action="store_true", help="skip part 2")
    parser.add_argument("--prune", action="store_true", help=f"part 2 also runs -p {PRUNE}, with and without validation")
    parser.add_argument("--baseline", metavar="DIR",
                        help=f"with --prune: also run the validated prune with the onnxopt checkout in DIR")
    parser.add_argument("--_worker", nargs=3, metavar=("KIND", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        kind, src, dst = args._worker
        {"bare": bare_worker, "check": check_worker}[kind](src, dst)
        return

    results: dict = {"python": sys.version.split()[0], "onnx": onnx.__version__, "cpus": os.cpu_count()}
    if not args.skip_dce:
        print("part 1: dce on generated graphs (best of 3)", flush=True)
        dce = bench_dce()
        results["dce"] = dce
        print("\n| nodes | initializers | dce best CPU s | dce best wall s | CPU us/node | nodes removed "
              "| initializers removed | bare walk CPU s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in dce["sizes"].items():
            print(f"| {r['nodes']} | {r['initializers']} | {r['best_cpu_s']:.4f} | {r['best_s']:.4f} | "
                  f"{r['best_cpu_s'] / r['nodes'] * 1e6:.2f} | {r['stats']['nodes_removed']} | "
                  f"{r['stats']['initializers_removed']} | {r['walk_best_cpu_s']:.4f} |")
        print(f"\nratio 100k/10k (CPU time): {dce['ratio']:.2f} (target <= {dce['target']:g}): "
              f"{'OK' if dce['ok'] else 'MISSED'}; wall-time ratio {dce['wall_ratio']:.2f}; "
              f"bare node walk on the same graphs (CPU): {dce['walk_ratio']:.2f}\n", flush=True)

    if not args.skip_big:
        folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnxopt-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            print(f"part 2: writing a {args.size_gb:g} GiB model in {folder}", flush=True)
            start = time.perf_counter()
            if args.reuse and (folder / "model.json").is_file():
                model = json.loads((folder / "model.json").read_text())
            else:
                model = write_big_model(folder, args.size_gb)
                (folder / "model.json").write_text(json.dumps(model))
            model["write_s"] = time.perf_counter() - start
            print(f"  {model['gib']:.3f} GiB, {model['nodes']} nodes ({model['live_nodes']} live), "
                  f"written in {model['write_s']:.1f} s", flush=True)
            rows = run_tools(folder, model, args.skip_peers, args.keep, args.repeats, args.prune, args.baseline)
            results["big"] = {"model": model, "rows": rows, "targets": verdicts(rows)}
            print(f"\nmodel: {model['gib']:.3f} GiB ({model['bytes']} bytes), {model['nodes']} nodes\n")
            print(table(rows))
            print()
            for k, v in results["big"]["targets"].items():
                print(f"{k}: {v['value']:.2f} (target <= {v['target']:g}): {'OK' if v['ok'] else 'MISSED'}")
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                print(f"kept {folder}")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "core.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {OUT_DIR / 'core.json'}")


if __name__ == "__main__":
    main()
