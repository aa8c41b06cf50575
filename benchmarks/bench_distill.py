"""distill: pruned models with and without repair against the original, scored on held-out eval data.

    python benchmarks/bench_distill.py [--models ../shared/models] [--samples samples]

For samples/mlp, cnn, transformer and the shared digits_mlp / digits_cnn: prune 50 % and 70 %
(magnitude) and prune-neurons 50 % + zero-rows, each as is and with ``distill`` (after zero-rows, or
between prune-neurons and zero-rows, where hidden layers still have the teacher's width), run through
``onnxopt.optimize`` with the model's calibration file. Scores are on the EVAL file (never seen by
distill): top-1 accuracy (where labels exist) and output cosine to the dense model; plus distill's
own calibration error before/after and its run time. Prints a markdown table and writes
benchmarks/out/bench_distill.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from common import SAMPLES, SHARED_MODELS, cases, fmt, outputs, score  # noqa: E402
from onnxopt.data import load_feeds, name_positional_inputs  # noqa: E402

NEURONS = "prune-neurons(ratio=0.5)"
SETTINGS = (  # (label, without distill, with distill)
    ("prune 50%", "prune(sparsity=0.5)", "prune(sparsity=0.5),distill"),
    ("prune 70%", "prune(sparsity=0.7)", "prune(sparsity=0.7),distill"),
    ("neurons 50% + zero-rows", f"{NEURONS},zero-rows", f"{NEURONS},zero-rows,distill"),
    ("neurons 50%, distill before zero-rows", f"{NEURONS},zero-rows", f"{NEURONS},distill,zero-rows"),
)


DISTILLED = ("samples/mlp", "samples/cnn", "samples/transformer", "digits_mlp", "digits_cnn")


def rows_for(name, path, calib_path, eval_path, labels) -> list[dict]:
    model = onnx.load(path)
    calib = name_positional_inputs(load_feeds(calib_path), model)
    evals = name_positional_inputs(load_feeds(eval_path), model)
    dense = outputs(model, evals, optimize=False)
    rows = [{"model": name, "setting": "dense", "distill": False, **score(dense, dense, labels)}]
    for setting, *pipelines in SETTINGS:
        for repaired, pipeline in enumerate(pipelines):
            result = onnxopt.optimize(model, pipeline, calib=calib, validate=False)
            row = {"model": name, "setting": setting, "distill": bool(repaired),
                   **score(dense, outputs(result.model, evals, optimize=False), labels)}
            step = next((s for s in result.report.steps if s.name == "distill"), None)
            if step is not None:
                row.update(stats=step.stats, seconds=step.seconds)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | acc | acc + distill | cosine | cosine + distill | "
             "distill calib rel err (before → after) | layers refit / biases corrected / reverted | distill s |",
             "|---" * 9 + "|"]
    by = {(r["model"], r["setting"], r["distill"]): r for r in rows}
    for (model, setting, repaired), plain in by.items():
        if repaired or setting == "dense":
            continue
        fixed = by[(model, setting, True)]
        st = fixed["stats"]
        lines.append(
            f"| {model} | {setting} | {fmt(plain.get('accuracy'), 3)} | {fmt(fixed.get('accuracy'), 3)} | "
            f"{fmt(plain['cosine'])} | {fmt(fixed['cosine'])} | "
            f"{st['calib_rel_err_before']:.3f} → {st['calib_rel_err_after']:.3f} | "
            f"{st['layers_refit']} / {st['biases_corrected']} / {st['layers_reverted']} | "
            f"{fixed['seconds']:.2f} |")
    dense = [r for r in rows if r["setting"] == "dense" and "accuracy" in r]
    lines.append("")
    lines.append("Dense accuracy: " + ", ".join(f"{r['model']} {r['accuracy']:.3f}" for r in dense))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    args = parser.parse_args()
    rows = []
    for case in cases(args.models, args.samples, only=DISTILLED):
        print(case[0], file=sys.stderr)
        rows += rows_for(*case)
    print(table(rows))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
