"""Weight-only quantization side by side: onnxopt quantize-weights (RTN, GPTQ) vs onnxruntime's
MatMulNBitsQuantizer (RTN symmetric and asymmetric; HQQ and GPTQ where their dependencies exist) and
quantize_dynamic (int8), int4 block 32 unless said otherwise.

    python benchmarks/bench_weight_only.py                      # minilm_l3 and samples/transformer
    python benchmarks/bench_weight_only.py --decoder-gb 2.5     # plus a generated decoder of that size (once)
    python benchmarks/bench_weight_only.py --decoder-small --decoder-only   # a 0.08 GB decoder: RTN vs GPTQ
    python benchmarks/bench_weight_only.py --decoder-medium --decoder-only  # 0.57 GB (d 1024): RTN vs GPTQ

The generated decoder reads token ids drawn with text's word frequencies (Zipf, ``--tokens uniform``
for the old uniform ids: white layer inputs); it is calibrated on ``--calib-samples`` sequences of
``--calib-seq`` tokens and scored on distinct held-out sequences (another seed) of the same kind.

Every tool runs in its own child process: wall time and peak RSS (the child's own high-water mark,
VmHWM) include loading and saving, as a user running it would see. Scores run in
further children, one model at a time: minilm_l3 is scored as its info.json says (cosine of the
masked-mean sentence embedding to fp32, mean and worst over the eval sentences); the others by the
cosine of their first output to fp32 over the eval samples (the decoder: logits). ``file x fp32`` is
the model file plus its external data against the fp32 model's. Latency (small models): one child runs
fp32 and every output round-robin on the first eval sample, one thread, all graph optimizations,
median of 200 rounds, as a ratio to fp32. Numpy and onnxruntime run on one
thread in the scoring children (OPENBLAS_NUM_THREADS=1, intra_op_num_threads=1).
Prints markdown tables and writes benchmarks/out/bench_weight_only.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import SAMPLES, SHARED_MODELS  # noqa: E402
from decoder import DecoderConfig, build_decoder, token_feeds  # noqa: E402

ONNXOPT = [sys.executable, "-m", "onnxopt", "optimize"]
ORT_NBITS = """
import sys, onnx
from onnxruntime.quantization import matmul_nbits_quantizer as mq
kind, src, dst = sys.argv[1:4]
model = onnx.load(src)
if kind == "rtn_sym":
    config = mq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
elif kind == "rtn_asym":
    config = mq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False)
elif kind == "hqq":
    config = mq.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
else:  # its GPTQ runs in Intel Neural Compressor; the reader gives it the same calibration samples as ours
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            arrays = np.load(sys.argv[4])
            self.feeds = iter([{k: arrays[k][i] for k in arrays.files} for i in range(len(arrays[arrays.files[0]]))])

        def get_next(self):
            return next(self.feeds, None)

    config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=32)
quantizer = mq.MatMulNBitsQuantizer(model, algo_config=config)
quantizer.process()
quantizer.model.save_model_to_file(dst, use_external_data_format=sys.argv[-1] == "ext")
"""
ORT_DYNAMIC = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], per_channel=True, weight_type=QuantType.QInt8,
                 use_external_data_format=len(sys.argv) > 3)
"""
SCORE = """
import json, sys
import numpy as np, onnxruntime as ort
path, feeds_path, out_path, lengths_path = sys.argv[1:5]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feeds = np.load(feeds_path)
lengths = np.load(lengths_path)["lengths"] if lengths_path != "-" else None
rows = []
for i in range(len(feeds[feeds.files[0]])):
    out = session.run(None, {k: feeds[k][i] for k in feeds.files})[0]
    if lengths is not None:  # minilm_l3/info.json: masked mean of the first lengths[i] tokens, L2-normalised
        out = out[0, : lengths[i]].mean(0)
    rows.append(out.astype(np.float32).ravel())
np.save(out_path, np.array(rows))
"""


LATENCY = """
import json, sys, time
import numpy as np, onnxruntime as ort
feeds_path, rounds, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
arrays = np.load(feeds_path)
feed = {k: arrays[k][0] for k in arrays.files}
for s in sessions:
    for _ in range(5):
        s.run(None, feed)
times = [[] for _ in sessions]
for _ in range(rounds):  # round-robin: load on the machine hits every model alike
    for s, t in zip(sessions, times):
        start = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - start)
print(json.dumps([float(np.median(t) * 1e3) for t in times]))
"""


def child(command: list[str], env_extra: dict | None = None) -> dict:
    """Run a command; its wall time, peak RSS and whether it succeeded.

    Peak RSS is the child's own high-water mark (VmHWM of /proc/PID/status, read every 20 ms while it
    runs: monotonic, so only growth in its last 20 ms can be missed). ru_maxrss from wait4 is not used:
    a forked child starts with its parent's high-water mark.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", **(env_extra or {})}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _high_water_kib(process.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    return {"ok": process.returncode == 0, "wall_s": round(wall, 2), "peak_rss_mib": round(peak / 1024, 1),
            "tail": output.strip().splitlines()[-1:]}


def _high_water_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def op_count(path: Path, op: str) -> int:
    import onnx

    return sum(n.op_type == op for n in onnx.load(path, load_external_data=False).graph.node)


def scores(path: Path, feeds: Path, lengths: Path | None, work: Path, tag: str) -> np.ndarray:
    out = work / f"{tag.replace('/', '_').replace(' ', '_')}.scores.npy"
    result = child([sys.executable, "-c", SCORE, str(path), str(feeds), str(out), str(lengths or "-")])
    if not result["ok"]:
        raise RuntimeError(f"scoring {path} failed: {result['tail']}")
    return np.load(out)


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    num = np.sum(reference.astype(np.float64) * candidate, axis=1)
    return num / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))


def tools(calib: Path, external: bool, data: Path | None) -> dict[str, callable]:
    """name -> function(src, dst) returning the command that writes dst."""
    ext = ["--external-data"] if external else []
    table = {
        "onnxopt rtn": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p", "quantize-weights", "--no-validate", *ext],
        "onnxopt rtn, embeddings float": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p",
                                                       "quantize-weights(embeddings=false)", "--no-validate", *ext],
        "onnxopt rtn, embeddings int8": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p",
                                                      "quantize-weights(embedding_bits=8)", "--no-validate", *ext],
        "onnxopt gptq": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p", "quantize-weights(method=gptq)",
                                      "--calib", str(calib), "--no-validate", *ext],
        "onnxopt gptq, embeddings float": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p",
                                                        "quantize-weights(method=gptq,embeddings=false)",
                                                        "--calib", str(calib), "--no-validate", *ext],
        "onnxopt gptq, no shrinkage": lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p",
                                                    "quantize-weights(method=gptq,shrinkage=false)",
                                                    "--calib", str(calib), "--no-validate", *ext],
        "onnxopt gptq, no shrinkage, input order": lambda s, d: [
            *ONNXOPT, str(s), "-o", str(d), "-p", "quantize-weights(method=gptq,shrinkage=false,act_order=false)",
            "--calib", str(calib), "--no-validate", *ext],
        "ort rtn sym (default)": lambda s, d: [sys.executable, "-c", ORT_NBITS, "rtn_sym", str(s), str(d),
                                               *(["ext"] if external else [])],
        "ort rtn asym": lambda s, d: [sys.executable, "-c", ORT_NBITS, "rtn_asym", str(s), str(d),
                                      *(["ext"] if external else [])],
        "ort hqq": lambda s, d: [sys.executable, "-c", ORT_NBITS, "hqq", str(s), str(d)],
        "ort gptq": lambda s, d: [sys.executable, "-c", ORT_NBITS, "gptq", str(s), str(d), str(calib)],
        "ort quantize_dynamic int8": lambda s, d: [sys.executable, "-c", ORT_DYNAMIC, str(s), str(d),
                                                   *(["ext"] if external else [])],
    }
    if data is not None:  # the big model: with validation too (which must hold the fp32 model in onnxruntime)
        table["onnxopt rtn, validated"] = lambda s, d: [*ONNXOPT, str(s), "-o", str(d), "-p", "quantize-weights",
                                                        "--data", str(data), *ext]
    return table


def bench_model(name: str, model: Path, calib: Path, evals: Path, lengths: Path | None, work: Path,
                only: list[str] | None, external: bool = False, data: Path | None = None,
                latency_rounds: int = 200) -> list[dict]:
    reference = scores(model, evals, lengths, work, f"{name}.fp32")
    rows, kept = [], {}
    for tool, command in tools(calib, external, data).items():
        if only and tool not in only:
            continue
        out = work / f"{name}.{tool}.onnx".replace("/", "_").replace(" ", "_").replace(",", "")
        run = child(command(model, out))
        row = {"model": name, "tool": tool, **run}
        if run["ok"] and out.exists():
            cos = cosine_rows(reference, scores(out, evals, lengths, work, out.stem))
            row.update(cosine_mean=round(float(cos.mean()), 5), cosine_worst=round(float(cos.min()), 5),
                       file_x_fp32=round(model_bytes(out) / model_bytes(model), 4),
                       matmulnbits=op_count(out, "MatMulNBits"),
                       gather_quantized=op_count(out, "GatherBlockQuantized"))
            if external:  # big models: not kept for the latency round
                for p in (out, out.with_name(out.name + ".data")):
                    p.unlink(missing_ok=True)
            else:
                kept[tool] = out
        rows.append(row)
        print(json.dumps(row), flush=True)
    if kept:
        timed = subprocess.run([sys.executable, "-c", LATENCY, str(evals), str(latency_rounds), str(model),
                                *map(str, kept.values())], capture_output=True, text=True, check=True)
        fp32, *others = json.loads(timed.stdout)
        for row in rows:
            if row["tool"] in kept:
                row["latency_x_fp32"] = round(others[list(kept).index(row["tool"])] / fp32, 3)
                row["fp32_latency_ms"] = round(fp32, 3)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tool | cosine mean / worst | file × fp32 | MatMulNBits / GatherBQ | latency × fp32 | wall s "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "cosine_mean" in r:
            lines.append(f"| {r['model']} | {r['tool']} | {r['cosine_mean']:.4f} / {r['cosine_worst']:.4f} | "
                         f"{r['file_x_fp32']:.3f} | {r['matmulnbits']} / {r['gather_quantized']} | "
                         f"{r.get('latency_x_fp32', '—')} | {r['wall_s']} | {r['peak_rss_mib']} |")
        else:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {' '.join(r['tail'])[:90]} | | | | {r['wall_s']} | "
                         f"{r['peak_rss_mib']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHARED_MODELS)
    parser.add_argument("--decoder-gb", type=float, default=0.0, help="also a generated decoder of this fp32 size")
    parser.add_argument("--decoder-only", action="store_true")
    parser.add_argument("--decoder-small", action="store_true",
                        help="also a small decoder (d 512, 4 layers, SwiGLU 1408, vocab 8000: 0.08 GB): RTN vs GPTQ")
    parser.add_argument("--decoder-medium", action="store_true",
                        help="also a decoder of d 1024, 6 layers, SwiGLU 2816, vocab 32000 (0.57 GB): RTN vs GPTQ")
    parser.add_argument("--tokens", choices=["zipf", "uniform"], default="zipf", help="decoder token ids")
    parser.add_argument("--calib-samples", type=int, default=32, help="decoder calibration sequences")
    parser.add_argument("--calib-seq", type=int, default=64, help="tokens per decoder calibration sequence")
    parser.add_argument("--tools", nargs="*", help="only these tools (names as in the table)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated models (default: a temp dir)")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-woq-", dir=args.work) as tmp:
        work = Path(tmp)
        if not args.decoder_only:
            minilm = args.models / "minilm_l3"
            if minilm.is_dir():
                rows += bench_model("minilm_l3", minilm / "model.onnx", minilm / "calib.npz", minilm / "eval.npz",
                                    minilm / "eval.lengths.npz", work, args.tools)
            rows += bench_model("samples/transformer", SAMPLES / "transformer.onnx", SAMPLES / "transformer.calib.npz",
                                SAMPLES / "transformer.eval.npz", None, work, args.tools)
        decoders = []
        gptq_tools = ["onnxopt rtn", "onnxopt gptq", "onnxopt gptq, no shrinkage", "onnxopt gptq, no shrinkage, input order",
                      "onnxopt rtn, embeddings float", "onnxopt gptq, embeddings float", "ort rtn sym (default)",
                      "ort rtn asym"]
        if args.decoder_small:
            decoders.append((DecoderConfig(vocab=8000, dim=512, layers=4, heads=8, ffn=1408), args.tools or gptq_tools))
        if args.decoder_medium:
            decoders.append((DecoderConfig(dim=1024, layers=6, ffn=2816), args.tools or gptq_tools))
        if args.decoder_gb:
            # dim 2048, 16 heads, SwiGLU 5632, vocab 32000, untied head: layers to reach the size asked
            base = DecoderConfig()
            per_layer = 4 * base.dim ** 2 + 3 * base.dim * base.ffn
            layers = max(1, round((args.decoder_gb * 1e9 / 4 - 2 * base.vocab * base.dim) / per_layer))
            decoders.append((DecoderConfig(layers=layers),
                             args.tools or ["onnxopt rtn", "onnxopt rtn, validated", "ort rtn sym (default)"]))
        for config, names in decoders:
            folder = work / f"decoder{config.dim}x{config.layers}"
            folder.mkdir()
            path = build_decoder(folder / "decoder.onnx", config)
            print(f"decoder: {config.layers} layers, {config.parameters / 1e6:.0f}M parameters, "
                  f"{model_bytes(path) / 1e9:.2f} GB fp32", flush=True)
            evals = token_feeds(folder / "eval.npz", config, samples=8, seq=64, seed=2, distribution=args.tokens)
            calib = token_feeds(folder / "calib.npz", config, samples=args.calib_samples, seq=args.calib_seq, seed=3,
                                distribution=args.tokens)
            data = token_feeds(folder / "data.npz", config, samples=2, seq=32, seed=4, distribution=args.tokens)
            rows += bench_model(f"decoder {model_bytes(path) / 1e9:.2f} GB", path, calib, evals, None, work,
                                names, external=True, data=data)
    print(table(rows))
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_weight_only.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
