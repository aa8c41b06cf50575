"""Build the sample models in samples/: an MLP, a small CNN and a transformer encoder block.

Run as ``python samples/build_samples.py [--out samples]``. Everything is deterministic
(numpy ``default_rng`` with fixed seeds), so a rebuild reproduces the committed files.

Each graph is written with onnxscript (opset 17, symbolic batch dimension ``batch``); its
weights are function inputs that are turned into initializers after ``to_model_proto()``.

The MLP and the CNN are real classifiers of synthetic, learnable tasks: their hidden layers
keep a seeded He init (the CNN's BatchNormalization statistics are measured on training data,
as a trained network's would be) and the last layer is fitted by ridge least squares on the
hidden features of a training set, so eval accuracy is high and labels exist. The transformer
block has Xavier init and a few LayerNormalization gamma entries scaled up, which gives the
outlier activation channels real transformers have.

For each model ``<name>.calib.npz`` and ``<name>.eval.npz`` hold 64 samples each, sample-major:
``{input name: (N, 1, *rest)}``, sample ``i`` is fed as ``{name: arr[i]}``. The MLP and the CNN
also get ``<name>.labels.npz`` with ``labels`` (N,) int64 for the eval samples. ``build_<name>(samples)``
draws larger sets from the same seeds (benchmarks/bench_distill.py measures on 1024 of each).
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxscript import FLOAT, script
from onnxscript import opset17 as op

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17
PRODUCER = "onnxopt samples/build_samples.py"
SAMPLES = 64  # samples in each .calib.npz / .eval.npz
CLASSES = 10

# Seeds: one per role, so calibration and evaluation data never coincide.
SEED_TASK, SEED_WEIGHTS, SEED_TRAIN, SEED_CALIB, SEED_EVAL = 1000, 2000, 3000, 4000, 5000


@dataclass
class Sample:
    name: str
    model: onnx.ModelProto
    calib: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # eval labels (mlp, cnn)
    description: str = ""


# ---------------------------------------------------------------------------------------------
# helpers


def _rng(seed: int, model: str) -> np.random.Generator:
    """A generator per (role, model): the same role gives different streams for each model."""
    return np.random.default_rng([seed, sum(map(ord, model))])


def _snap(a: np.ndarray, bits: int = 12) -> np.ndarray:
    """Round to ``bits`` mantissa bits, as float32.

    Values computed through BLAS/LAPACK (fitted weights, measured statistics) could differ in
    their last bits between machines; rounding them keeps a rebuild bit-identical.
    """
    mantissa, exponent = np.frexp(np.asarray(a, dtype=np.float64))
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent).astype(np.float32)


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _xavier(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    return (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)


def _to_model(fn, name: str, weights: dict[str, np.ndarray], doc: str) -> onnx.ModelProto:
    """Script function -> ModelProto whose weight inputs become initializers."""
    model = fn.to_model_proto(ir_version=IR_VERSION)
    params = [v.name for v in model.graph.input]
    missing = [w for w in weights if w not in params]
    if missing:
        raise ValueError(f"{name}: weights {missing} are not inputs of the script function")
    data_inputs = [v for v in model.graph.input if v.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    for param in params:  # initializers in the function's parameter order
        if param in weights:
            arr = np.ascontiguousarray(weights[param], dtype=np.float32)
            model.graph.initializer.append(numpy_helper.from_array(arr, param))
    model.graph.name = name
    model.doc_string = doc
    model.producer_name = PRODUCER
    model.producer_version = "1"
    onnx.checker.check_model(model, full_check=True)
    return model


def _ridge_fit(features: np.ndarray, labels: np.ndarray, lam: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares classifier head: W (F, C), b (C,) from features (N, F) in float64."""
    n, f = features.shape
    design = np.concatenate([features, np.ones((n, 1))], axis=1)
    target = 4.0 * (np.eye(CLASSES)[labels] - 1.0 / CLASSES)
    gram = design.T @ design + lam * n * np.eye(f + 1)
    gram[f, f] -= lam * n  # no penalty on the bias
    solution = np.linalg.solve(gram, design.T @ target)
    return _snap(solution[:f]), _snap(solution[f])


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def _check_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], expected: np.ndarray) -> None:
    """The ONNX graph computes what the numpy reference used for fitting computes."""
    got = run(model, feeds)[0]
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
        raise AssertionError(f"{model.graph.name}: onnxruntime differs from the numpy reference "
                             f"by {np.abs(got - expected).max():.3g}")


def accuracy(model: onnx.ModelProto, feeds: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on sample-major feeds, run with onnxruntime."""
    return top1(run(model, feeds)[0], labels)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits already computed (argmax over the last axis)."""
    return float((logits.argmax(axis=-1) == labels).mean())


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run sample-major feeds as one batch (samples joined along the batch axis)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch = {name: arr.reshape(-1, *arr.shape[2:]) for name, arr in feeds.items()}
    return session.run(None, batch)


# ---------------------------------------------------------------------------------------------
# mlp: x [batch, 64] -> 256 -> 128 -> logits [batch, 10]


@script(default_opset=op)
def mlp_graph(
    x: FLOAT["batch", 64],
    fc1_weight: FLOAT[256, 64],
    fc1_bias: FLOAT[256],
    fc2_weight: FLOAT[256, 128],
    fc2_bias: FLOAT[128],
    head_weight: FLOAT[128, 10],
    head_bias: FLOAT[10],
) -> FLOAT["batch", 10]:
    h1 = op.Relu(op.Gemm(x, fc1_weight, fc1_bias, transB=1))
    h2 = op.Relu(op.Gemm(h1, fc2_weight, fc2_bias))
    logits = op.Add(op.MatMul(h2, head_weight), head_bias)
    return logits


def _mlp_task(rng: np.random.Generator):
    """10 classes, each a mixture of 2 Gaussian clusters in 64-d (not linearly trivial)."""
    prototypes = rng.standard_normal((CLASSES, 2, 64))

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, n)
        cluster = rng.integers(0, 2, n)
        x = prototypes[labels, cluster] + rng.standard_normal((n, 64))
        return x.astype(np.float32), labels.astype(np.int64)

    return draw


def build_mlp(samples: int = SAMPLES) -> Sample:
    name = "mlp"
    draw = _mlp_task(_rng(SEED_TASK, name))
    rng = _rng(SEED_WEIGHTS, name)
    w = {
        "fc1_weight": _he(rng, (256, 64), 64),
        "fc1_bias": (rng.standard_normal(256) * 0.05).astype(np.float32),
        "fc2_weight": _he(rng, (256, 128), 256),
        "fc2_bias": (rng.standard_normal(128) * 0.05).astype(np.float32),
    }
    x_train, y_train = draw(_rng(SEED_TRAIN, name), 2000)
    h = x_train.astype(np.float64)
    h = _relu(h @ w["fc1_weight"].T.astype(np.float64) + w["fc1_bias"])
    h = _relu(h @ w["fc2_weight"].astype(np.float64) + w["fc2_bias"])
    w["head_weight"], w["head_bias"] = _ridge_fit(h, y_train)

    doc = "MLP classifier 64 -> 256 -> 128 -> 10 on a synthetic 10-class Gaussian-mixture task"
    model = _to_model(mlp_graph, name, w, doc)
    _check_reference(model, {"x": x_train[:32, None]}, h[:32] @ w["head_weight"] + w["head_bias"])
    x_calib, _ = draw(_rng(SEED_CALIB, name), samples)
    x_eval, y_eval = draw(_rng(SEED_EVAL, name), samples)
    return Sample(name, model, {"x": x_calib[:, None]}, {"x": x_eval[:, None]}, y_eval, doc)


# ---------------------------------------------------------------------------------------------
# cnn: image [batch, 3, 32, 32] -> conv16 -> pool -> conv32 -> GAP -> logits [batch, 10]

BN_EPS = 1e-5


@script(default_opset=op)
def cnn_graph(
    image: FLOAT["batch", 3, 32, 32],
    conv1_weight: FLOAT[16, 3, 3, 3],
    bn1_scale: FLOAT[16],
    bn1_bias: FLOAT[16],
    bn1_mean: FLOAT[16],
    bn1_var: FLOAT[16],
    conv2_weight: FLOAT[32, 16, 3, 3],
    bn2_scale: FLOAT[32],
    bn2_bias: FLOAT[32],
    bn2_mean: FLOAT[32],
    bn2_var: FLOAT[32],
    fc_weight: FLOAT[10, 32],
    fc_bias: FLOAT[10],
) -> FLOAT["batch", 10]:
    c1 = op.Conv(image, conv1_weight, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    a1 = op.Relu(op.BatchNormalization(c1, bn1_scale, bn1_bias, bn1_mean, bn1_var, epsilon=1e-5))
    p1 = op.MaxPool(a1, kernel_shape=[2, 2], strides=[2, 2])
    c2 = op.Conv(p1, conv2_weight, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    a2 = op.Relu(op.BatchNormalization(c2, bn2_scale, bn2_bias, bn2_mean, bn2_var, epsilon=1e-5))
    pooled = op.Flatten(op.GlobalAveragePool(a2), axis=1)
    logits = op.Gemm(pooled, fc_weight, fc_bias, transB=1)
    return logits


def _conv3x3(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Conv 3x3, stride 1, pad 1, no bias: (N, C, H, W) x (O, C, 3, 3) -> (N, O, H, W)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N C H W 3 3
    return np.einsum("nchwij,ocij->nohw", windows, weight.astype(x.dtype), optimize=True)


def _batchnorm(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    shape = (1, -1, 1, 1)
    inv = w[f"{prefix}_scale"] / np.sqrt(w[f"{prefix}_var"].astype(np.float64) + BN_EPS)
    return (x - w[f"{prefix}_mean"].reshape(shape)) * inv.reshape(shape) + w[f"{prefix}_bias"].reshape(shape)


def _measure_bn(x: np.ndarray, rng: np.random.Generator, prefix: str) -> dict[str, np.ndarray]:
    """BatchNormalization as training would leave it: running stats of x, gamma ~ 1, small beta."""
    channels = x.shape[1]
    return {
        f"{prefix}_scale": (1.0 + 0.1 * rng.standard_normal(channels)).astype(np.float32),
        f"{prefix}_bias": (0.1 * rng.standard_normal(channels)).astype(np.float32),
        f"{prefix}_mean": _snap(x.mean(axis=(0, 2, 3))),
        f"{prefix}_var": _snap(x.var(axis=(0, 2, 3))),
    }


def _cnn_task(rng: np.random.Generator):
    """10 texture classes: oriented colour gratings (random phase, contrast, brightness) + noise.

    Images are stored like normalized 8-bit pictures: pixels in 0..255, then (p/255 - 0.5)/0.25.
    """
    angles = np.arange(CLASSES) * np.pi / CLASSES + rng.uniform(0, 0.1, CLASSES)
    freqs = rng.uniform(0.08, 0.3, CLASSES)  # cycles per pixel
    colours = rng.uniform(0.3, 1.0, (CLASSES, 3))
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)

    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, n)
        phase = rng.uniform(0, 2 * np.pi, n)
        contrast = rng.uniform(40, 70, n)
        brightness = rng.uniform(100, 150, (n, 3))
        a, f = angles[labels], freqs[labels]
        arg = 2 * np.pi * f[:, None, None] * (
            np.cos(a)[:, None, None] * xx + np.sin(a)[:, None, None] * yy
        ) + phase[:, None, None]
        wave = np.sin(arg)[:, None] * colours[labels][:, :, None, None] * contrast[:, None, None, None]
        pixels = brightness[:, :, None, None] + wave + rng.normal(0, 12, (n, 3, 32, 32))
        pixels = np.clip(np.round(pixels), 0, 255)
        return ((pixels / 255.0 - 0.5) / 0.25).astype(np.float32), labels.astype(np.int64)

    return draw


def build_cnn(samples: int = SAMPLES) -> Sample:
    name = "cnn"
    draw = _cnn_task(_rng(SEED_TASK, name))
    rng = _rng(SEED_WEIGHTS, name)
    w = {"conv1_weight": _he(rng, (16, 3, 3, 3), 27)}
    x_train, y_train = draw(_rng(SEED_TRAIN, name), 600)
    h = _conv3x3(x_train.astype(np.float64), w["conv1_weight"])
    w |= _measure_bn(h, rng, "bn1")
    h = _relu(_batchnorm(h, w, "bn1"))
    h = h.reshape(h.shape[0], 16, 16, 2, 16, 2).max(axis=(3, 5))  # MaxPool 2x2
    w["conv2_weight"] = _he(rng, (32, 16, 3, 3), 144)
    h = _conv3x3(h, w["conv2_weight"])
    w |= _measure_bn(h, rng, "bn2")
    h = _relu(_batchnorm(h, w, "bn2")).mean(axis=(2, 3))
    head_weight, w["fc_bias"] = _ridge_fit(h, y_train)
    w["fc_weight"] = np.ascontiguousarray(head_weight.T)

    doc = "CNN classifier conv16-bn-relu, maxpool, conv32-bn-relu, GAP, fc10 on synthetic gratings"
    model = _to_model(cnn_graph, name, w, doc)
    _check_reference(model, {"image": x_train[:32, None]}, h[:32] @ head_weight + w["fc_bias"])
    x_calib, _ = draw(_rng(SEED_CALIB, name), samples)
    x_eval, y_eval = draw(_rng(SEED_EVAL, name), samples)
    return Sample(name, model, {"image": x_calib[:, None]}, {"image": x_eval[:, None]}, y_eval, doc)


# ---------------------------------------------------------------------------------------------
# transformer: one pre-LN encoder block, tokens [batch, 16, 64] -> hidden [batch, 16, 64]

SEQ, DIM, HEADS, HEAD_DIM, FFN = 16, 64, 4, 16, 256
OUTLIER_CHANNELS = (7, 23, 41)  # LayerNormalization gamma entries scaled up by OUTLIER_GAINS
OUTLIER_GAINS = (12.0, 16.0, 20.0)


@script(default_opset=op)
def transformer_graph(
    tokens: FLOAT["batch", 16, 64],
    ln1_scale: FLOAT[64],
    ln1_bias: FLOAT[64],
    q_weight: FLOAT[64, 64],
    q_bias: FLOAT[64],
    k_weight: FLOAT[64, 64],
    k_bias: FLOAT[64],
    v_weight: FLOAT[64, 64],
    v_bias: FLOAT[64],
    out_weight: FLOAT[64, 64],
    out_bias: FLOAT[64],
    ln2_scale: FLOAT[64],
    ln2_bias: FLOAT[64],
    ffn1_weight: FLOAT[64, 256],
    ffn1_bias: FLOAT[256],
    ffn2_weight: FLOAT[256, 64],
    ffn2_bias: FLOAT[64],
) -> FLOAT["batch", 16, 64]:
    heads_shape = op.Constant(value_ints=[0, 0, 4, 16])  # [batch, seq, heads, head dim]
    model_shape = op.Constant(value_ints=[0, 0, 64])
    x = op.LayerNormalization(tokens, ln1_scale, ln1_bias, axis=-1, epsilon=1e-5)
    q = op.Add(op.MatMul(x, q_weight), q_bias)
    k = op.Add(op.MatMul(x, k_weight), k_bias)
    v = op.Add(op.MatMul(x, v_weight), v_bias)
    qh = op.Transpose(op.Reshape(q, heads_shape), perm=[0, 2, 1, 3])  # b h s d
    kt = op.Transpose(op.Reshape(k, heads_shape), perm=[0, 2, 3, 1])  # b h d s
    vh = op.Transpose(op.Reshape(v, heads_shape), perm=[0, 2, 1, 3])  # b h s d
    scores = op.Mul(op.MatMul(qh, kt), op.Constant(value_float=0.25))  # 1/sqrt(16)
    attn = op.Softmax(scores, axis=-1)
    ctx = op.Reshape(op.Transpose(op.MatMul(attn, vh), perm=[0, 2, 1, 3]), model_shape)
    h = op.Add(tokens, op.Add(op.MatMul(ctx, out_weight), out_bias))
    y = op.LayerNormalization(h, ln2_scale, ln2_bias, axis=-1, epsilon=1e-5)
    f = op.Add(op.MatMul(y, ffn1_weight), ffn1_bias)
    # GELU (exact): 0.5 * f * (1 + erf(f / sqrt(2))); opset 17 has no Gelu op
    gelu = op.Mul(
        op.Mul(op.Constant(value_float=0.5), f),
        op.Add(op.Constant(value_float=1.0), op.Erf(op.Mul(f, op.Constant(value_float=0.70710678)))),
    )
    hidden = op.Add(h, op.Add(op.MatMul(gelu, ffn2_weight), ffn2_bias))
    return hidden


def build_transformer(samples: int = SAMPLES) -> Sample:
    name = "transformer"
    rng = _rng(SEED_WEIGHTS, name)

    def layernorm(prefix: str) -> dict[str, np.ndarray]:
        scale = 1.0 + 0.05 * rng.standard_normal(DIM)
        scale[list(OUTLIER_CHANNELS)] *= OUTLIER_GAINS
        return {
            f"{prefix}_scale": scale.astype(np.float32),
            f"{prefix}_bias": (0.02 * rng.standard_normal(DIM)).astype(np.float32),
        }

    def linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_weight": _xavier(rng, fan_in, fan_out),
            f"{prefix}_bias": (0.02 * rng.standard_normal(fan_out)).astype(np.float32),
        }

    w = layernorm("ln1")
    for prefix in ("q", "k", "v", "out"):
        w |= linear(prefix, DIM, DIM)
    w |= layernorm("ln2")
    w |= linear("ffn1", DIM, FFN)
    w |= linear("ffn2", FFN, DIM)
    # As in trained models, queries and keys mostly ignore the outlier channels (otherwise they
    # would dominate the attention scores and every softmax row would be one-hot); values and
    # the MLP still see them at full size.
    for prefix in ("q", "k"):
        w[f"{prefix}_weight"][list(OUTLIER_CHANNELS)] /= np.array(OUTLIER_GAINS, dtype=np.float32)[:, None]

    # Already-embedded sequences: a 100-entry token embedding table plus sinusoidal positions,
    # stored at half precision (float16 values in float32 arrays) to keep the files small.
    task = _rng(SEED_TASK, name)
    table = task.standard_normal((100, DIM))
    position = np.arange(SEQ)[:, None] / 10000.0 ** (np.arange(0, DIM, 2) / DIM)[None]
    positions = np.stack([np.sin(position), np.cos(position)], axis=-1).reshape(SEQ, DIM)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        ids = rng.integers(0, len(table), (n, SEQ))
        return (table[ids] + positions).astype(np.float16).astype(np.float32)

    doc = "Pre-LN transformer encoder block: 4-head self-attention and a 64-256-64 GELU MLP"
    model = _to_model(transformer_graph, name, w, doc)
    calib = draw(_rng(SEED_CALIB, name), samples)
    evals = draw(_rng(SEED_EVAL, name), samples)
    return Sample(name, model, {"tokens": calib[:, None]}, {"tokens": evals[:, None]}, None, doc)


# ---------------------------------------------------------------------------------------------

BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "transformer": build_transformer}


def build_all() -> dict[str, Sample]:
    return {name: build() for name, build in BUILDERS.items()}


def write(sample: Sample, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{sample.name}.onnx", out / f"{sample.name}.calib.npz", out / f"{sample.name}.eval.npz"]
    onnx.save_model(sample.model, paths[0])
    np.savez_compressed(paths[1], **sample.calib)
    np.savez_compressed(paths[2], **sample.eval)
    if sample.labels is not None:
        paths.append(out / f"{sample.name}.labels.npz")
        np.savez_compressed(paths[-1], labels=sample.labels)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    total = 0
    for name, sample in build_all().items():
        for path in write(sample, args.out):
            total += path.stat().st_size
            print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
        outputs = run(sample.model, sample.eval)
        assert all(np.isfinite(o).all() for o in outputs), f"{name}: non-finite outputs"
        if sample.labels is not None:
            acc = top1(outputs[0], sample.labels)
            print(f"{name}: eval accuracy {acc:.3f} ({len(sample.labels)} samples)")
        else:
            print(f"{name}: output {outputs[0].shape}, |max| {np.abs(outputs[0]).max():.2f}")
    print(f"total {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
