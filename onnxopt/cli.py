"""Command line: parses, calls the Python API, prints. Exit codes: 0 ok, 1 validation failed, 2 bad input."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import click

from . import api
from .data import parse_input_shapes
from .benchmark import format_benchmark
from .errors import InputError, OnnxoptError
from .modelio import check_writable_target, write_file_atomically
from .pipeline import describe_options
from .registry import PASSES, PRESETS
from .report import jsonable, format_info
from .validate import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_COSINE, NOISE_FACTOR


class _Group(click.Group):
    """Turns onnxopt errors into one line on stderr and their exit code (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OnnxoptError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug of ours: say so in one line, keep the traceback for --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"internal error: {exc.__class__.__name__}: {exc} (run with --debug for a traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="onnxopt")
@click.option("--debug", is_flag=True, help="Show Python tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Make ONNX models smaller and faster, and prove they still compute what they computed."""
    ctx.obj = {"debug": debug}


def _debug_option(f):
    """``--debug`` after the subcommand too (``onnxopt optimize ... --debug``), not only before it."""

    def enable(ctx: click.Context, _param, value: bool) -> None:
        if value:
            ctx.find_root().obj["debug"] = True

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=enable,
                        help="Show Python tracebacks.")(f)


def _check_report_path(path: str | None) -> None:
    """A report that cannot be written is refused before the work it would report."""
    if path:
        try:
            check_writable_target(Path(path))
        except InputError as exc:
            raise InputError(f"--report: {exc}") from None


_input_shape = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
                            help="Shape for random feeds where the model's dims are symbolic (repeatable).")
_thresholds = [
    click.option("--min-cosine", type=float, help="Fail if any output's cosine to the original falls below this."),
    click.option("--max-abs", type=float, help="Fail if any output's max abs error to the original exceeds this."),
]


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the result (nothing is written without it).")
@click.option("-p", "--pipeline", required=True, help='Passes to run, e.g. "prune(sparsity=0.5),zero-rows,dce".')
@click.option("--data", type=click.Path(), help="Validation feeds: .npz (sample-major) or a folder of test_data_set_*.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class labels of the --data samples (.npz 'labels'): adds task accuracy.")
@click.option("--max-accuracy-drop", type=float,
              help=f"With --labels: fail a step whose accuracy falls more than this many points below the original's "
                   f"(default {DEFAULT_MAX_ACCURACY_DROP:g}; 100: off).")
@click.option("--calib", type=click.Path(), help="Calibration feeds for passes that need them (same formats).")
@click.option("--calib-cache", type=click.Path(dir_okay=False), help="Save/reuse calibration statistics here.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--report-html", type=click.Path(dir_okay=False), help="Write the report as one self-contained HTML page here.")
@click.option("--bench", is_flag=True, help="Time the original and the result in onnxruntime (interleaved) into the report.")
@click.option("--bench-runs", type=int, default=50, show_default=True, help="Timed runs per model for --bench.")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime runs (checker and interface checks still run).")
@click.option("--min-cosine", type=float,
              help=f"Fail a lossy step if any output's cosine to the original falls below this "
                   f"(default {DEFAULT_MIN_COSINE:g} without --labels, none with them; 0 relaxes it).")
@_apply(_thresholds[1:])
@click.option("--exact-rtol", type=float, default=1e-5, show_default=True, help="Tolerance gating exact passes.")
@click.option("--exact-atol", type=float, default=1e-6, show_default=True,
              help="Smallest atol gating exact passes (each output's is at least --noise-factor x its float noise).")
@click.option("--noise-factor", type=float, default=NOISE_FACTOR, show_default=True,
              help="Exact gate: atol per output = this x the model's float noise (optimized vs unoptimized onnxruntime).")
@_input_shape
@click.option("--keep-failed", is_flag=True, help="Write the output even if a step failed validation.")
@click.option("--overwrite-input", is_flag=True, help="Allow -o to name the input file.")
@click.option("--repro-dir", type=click.Path(file_okay=False), help="Where a failing step leaves its reproducer.")
@click.option("--external-data/--no-external-data", default=None,
              help="Force weights into MODEL.data or inline (default: external if the input had it or > 2 GB).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line (and the reproducer's path).")
@_debug_option
def optimize(model, output, pipeline, data, labels, max_accuracy_drop, calib, calib_cache, report_path, report_html,
             bench, bench_runs, no_validate, min_cosine, max_abs,
             exact_rtol, exact_atol, noise_factor, input_shapes, keep_failed, overwrite_input, repro_dir, external_data,
             progress, quiet) -> None:
    """Run PIPELINE on MODEL, validate every step with onnxruntime, write the result (with -o)."""
    _check_report_path(report_path)
    if report_html:
        check_writable_target(Path(report_html))
    result = api.optimize(
        model, pipeline, output=output, data=data, labels=labels, calib=calib, validate=not no_validate,
        min_cosine=min_cosine, max_abs=max_abs, max_accuracy_drop=max_accuracy_drop, exact_rtol=exact_rtol, exact_atol=exact_atol,
        noise_factor=noise_factor, input_shapes=parse_input_shapes(input_shapes), calib_cache=calib_cache,
        repro_dir=repro_dir or Path.cwd() / f"onnxopt-repro-{time.strftime('%Y%m%d-%H%M%S')}",
        keep_failed=keep_failed, overwrite_input=overwrite_input, external_data=external_data,
        progress=sys.stderr.isatty() if progress is None else progress, bench=bench, bench_runs=bench_runs,
    )
    report = result.report
    if report_path:
        report.write_json(report_path)
    if report_html:
        report.write_html(report_html)
    table = report.table()
    click.echo("\n".join(line for line in table.splitlines() if line.startswith(("verdict:", "reproducer:")))
               if quiet else table)
    if output and report.output:
        click.echo(f"wrote {report.output}")
    elif output:
        click.echo(f"nothing written to {output} (use --keep-failed to write it anyway)", err=True)
    else:
        click.echo("nothing written: no -o/--output given (validation only)", err=True)
    if not report.passed:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--markdown", is_flag=True, help="The README's pass table.")
@_debug_option
def passes(as_json: bool, markdown: bool) -> None:
    """List every registered pass with its options."""
    rows = pass_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if markdown:
        click.echo(pass_table_markdown(rows))
        return
    for row in rows:
        click.echo(f"{row['name']:<16} {'exact' if row['exact'] else 'lossy'}  {row['summary']}")
        for opt in row["options"]:
            click.echo(f"    {opt['name']}: {opt['type']} = {opt['default']}")
    for name, steps in PRESETS.items():
        click.echo(f"{name:<16} preset {steps}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_debug_option
def info(model: str, as_json: bool) -> None:
    """Opset, inputs/outputs, op histogram, parameters, bytes, sparsity, subgraphs, external data."""
    details = api.info(model)
    click.echo(json.dumps(details, indent=2) if as_json else format_info(details))


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Feeds: .npz (sample-major) or a folder of test_data_set_*.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class labels of the --data samples: adds task accuracy.")
@_apply(_thresholds)
@_input_shape
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON comparison here.")
@_debug_option
def compare(reference, candidate, data, labels, min_cosine, max_abs, input_shapes, report_path) -> None:
    """Run REFERENCE and CANDIDATE on the same feeds and compare every output (exit 1 if a threshold fails)."""
    _check_report_path(report_path)
    comparison, feeds = api.compare(reference, candidate, data=data, labels=labels, min_cosine=min_cosine, max_abs=max_abs,
                                    input_shapes=parse_input_shapes(input_shapes))
    document = {"reference": reference, "candidate": candidate, "feeds": feeds, **comparison.to_dict()}
    if report_path:
        write_file_atomically(report_path, json.dumps(jsonable(document), indent=2).encode())
    click.echo(f"feeds: {feeds['origin']} ({feeds['samples']} samples)")
    click.echo(f"{'output':<24} {'max abs':>10} {'max rel':>10} {'rel L2':>10} {'cosine':>10} {'SNR dB':>8} {'top-1':>7}")
    for name, m in comparison.outputs.items():
        top1 = "-" if m.top1_agreement is None else f"{m.top1_agreement:.1%}"
        click.echo(f"{name:<24} {m.max_abs:>10.3g} {m.max_rel:>10.3g} {m.rel_l2:>10.3g} {m.cosine:>10.6f} "
                   f"{m.snr_db:>8.1f} {top1:>7}")
    if "accuracy" in feeds:
        click.echo(f"accuracy: reference {feeds['accuracy']['reference']:.2%}, "
                   f"candidate {feeds['accuracy']['candidate']:.2%}")
    click.echo("verdict: PASSED" if comparison.passed else "verdict: FAILED: " + "; ".join(comparison.failures))
    if not comparison.passed:
        sys.exit(1)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), help="Feeds: .npz (sample-major) or a folder of test_data_set_* (default: random).")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model (interleaved).")
@_input_shape
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(models, data, threads, runs, input_shapes, as_json) -> None:
    """onnxruntime CPU latency, throughput, file size and peak memory of MODELS, each against the first."""
    result = api.bench(list(models), data=data, threads=threads, runs=runs,
                       input_shapes=parse_input_shapes(input_shapes))
    click.echo(json.dumps(jsonable(result.to_dict()), indent=2) if as_json else format_benchmark(result))


@main.command()
@click.argument("report_json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML page to write.")
def report(report_json, output) -> None:
    """Render a JSON report (from optimize --report) as one self-contained HTML page."""
    api.report_html(report_json, output)
    click.echo(f"wrote {output}")


def pass_rows() -> list[dict]:
    return [
        {"name": p.name, "exact": p.exact, "summary": p.summary,
         "options": [{"name": n, "type": t, "default": d} for n, t, d in describe_options(p.Options)]}
        for p in PASSES.values()
    ]


def pass_table_markdown(rows: list[dict]) -> str:
    lines = ["| pass | kind | what it does | options (type = default) |", "|---|---|---|---|"]
    for row in rows:
        options = "<br>".join(
            "`{}`: {} = `{}`".format(o["name"], *(text.replace("|", "\\|") for text in (o["type"], o["default"])))
            for o in row["options"]
        )
        lines.append(f"| `{row['name']}` | {'exact' if row['exact'] else 'lossy'} | {row['summary']} | {options or 'none'} |")
    return "\n".join(lines)
