"""A generated LLaMA-like decoder-only transformer with external data, of any size.

    python benchmarks/decoder.py OUT.onnx [--dim 2048 --layers 10 --ffn 5632 --heads 16 --vocab 32000] [--tied]

RMSNorm, rotary positions, causal multi-head attention, SwiGLU MLP, final RMSNorm and an LM head
(untied: ``MatMul`` on its own ``(D, V)`` matrix; tied: ``Gemm(transB=1)`` on the embedding table,
which the ``Gather`` reads too). Input ``input_ids`` int64 ``[batch, seq]``, output ``logits``
``[batch, seq, vocab]``. Weights are drawn seeded as PyTorch initialises an untrained model
(``nn.Embedding``: N(0, 1); ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm gains 1) and
written straight to ``OUT.onnx.data`` in chunks as the graph is built, so building a model of many
GB holds one chunk of one tensor at a time. Tests build tiny ones in code with :func:`build_decoder`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 4096
CHUNK = 1 << 24  # elements drawn and written at a time


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 32000
    dim: int = 2048
    layers: int = 10
    heads: int = 16
    ffn: int = 5632
    max_seq: int = 128
    tied: bool = False
    seed: int = 0

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.ffn + 2 * self.dim
        head = 0 if self.tied else self.dim * self.vocab
        return self.vocab * self.dim + self.layers * per_layer + self.dim + head


class _ExternalWriter:
    """Appends weights to one data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.file = open(data_path, "wb")
        self.location = data_path.name
        self.rng = np.random.default_rng(seed)

    def tensor(self, name: str, shape: tuple[int, ...], init: str) -> TensorProto:
        """A tensor drawn as ``init`` says (normal: N(0, 1); linear: U(+-1/sqrt(shape[0])); ones), written in chunks."""
        pad = -self.file.tell() % ALIGN
        self.file.write(b"\0" * pad)
        offset = self.file.tell()
        total = int(np.prod(shape))
        for start in range(0, total, CHUNK):
            size = min(CHUNK, total - start)
            if init == "ones":
                chunk = np.ones(size, np.float32)
            elif init == "normal":
                chunk = self.rng.standard_normal(size, dtype=np.float32)
            else:
                chunk = (self.rng.random(size, dtype=np.float32) * 2 - 1) / np.float32(np.sqrt(shape[0]))
            self.file.write(chunk.tobytes())
        proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(total * 4))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        self.file.close()


def build_decoder(path: str | Path, config: DecoderConfig = DecoderConfig()) -> Path:
    """Write ``path`` (the graph) and ``path.data`` (the weights); return ``path``."""
    path = Path(path)
    c = config
    head_dim = c.dim // c.heads
    writer = _ExternalWriter(path.with_name(path.name + ".data"), c.seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name: str, shape: tuple[int, ...], init: str = "linear") -> str:
        inits.append(writer.tensor(name, shape, init))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def rms_norm(x: str, gain: str, prefix: str) -> str:
        sq = node("Mul", [x, x], f"{prefix}_sq")
        mean = node("ReduceMean", [sq, "axis_last"], f"{prefix}_mean", keepdims=1)
        root = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}_var")], f"{prefix}_rms")
        return node("Mul", [node("Div", [x, root], f"{prefix}_normed"), gain], f"{prefix}_out")

    def rotary(x: str, prefix: str) -> str:  # x: (B, H, S, hd)
        halves = [f"{prefix}_x1", f"{prefix}_x2"]
        nodes.append(helper.make_node("Split", [x, "half_split"], halves, axis=-1, name=f"{prefix}_split"))
        rotated = node("Concat", [node("Neg", [halves[1]], f"{prefix}_neg"), halves[0]], f"{prefix}_rot", axis=-1)
        return node("Add", [node("Mul", [x, "cos"], f"{prefix}_xcos"), node("Mul", [rotated, "sin"], f"{prefix}_xsin")],
                    f"{prefix}_out")

    const("axis_last", np.array([-1], np.int64))
    const("eps", np.array(1e-6, np.float32))
    const("half_split", np.array([head_dim // 2, head_dim // 2], np.int64))
    const("heads_shape", np.array([0, 0, c.heads, head_dim], np.int64))
    const("merge_shape", np.array([0, 0, c.dim], np.int64))
    const("attn_scale", np.array(1 / np.sqrt(head_dim), np.float32))
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(c.max_seq), inv_freq)
    const("cos_table", np.cos(np.concatenate([angles, angles], -1)).astype(np.float32))
    const("sin_table", np.sin(np.concatenate([angles, angles], -1)).astype(np.float32))
    const("causal_table", np.triu(np.full((c.max_seq, c.max_seq), -1e9, np.float32), 1))
    const("zero", np.array([0], np.int64))
    const("one", np.array([1], np.int64))

    seq = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), "one", node("Add", ["one", "one"], "two")], "seq")
    node("Slice", ["cos_table", "zero", seq, "zero"], "cos")
    node("Slice", ["sin_table", "zero", seq, "zero"], "sin")
    node("Slice", [node("Slice", ["causal_table", "zero", seq, "zero"], "causal_rows"), "zero", seq, "one"], "causal")

    embed = weight("embed_tokens", (c.vocab, c.dim), "normal")
    h = node("Gather", [embed, "input_ids"], "embedded", axis=0)
    for i in range(c.layers):
        p = f"layer{i}"
        x = rms_norm(h, weight(f"{p}.attn_norm", (c.dim,), "ones"), f"{p}_attn_norm")
        heads = {}
        for proj in ("q", "k", "v"):
            flat = node("MatMul", [x, weight(f"{p}.{proj}_proj", (c.dim, c.dim))], f"{p}_{proj}")
            split = node("Reshape", [flat, "heads_shape"], f"{p}_{proj}_heads")
            heads[proj] = node("Transpose", [split], f"{p}_{proj}_bhsd", perm=[0, 2, 1, 3])
        q, k = rotary(heads["q"], f"{p}_q_rope"), rotary(heads["k"], f"{p}_k_rope")
        scores = node("MatMul", [q, node("Transpose", [k], f"{p}_kT", perm=[0, 1, 3, 2])], f"{p}_scores")
        scores = node("Add", [node("Mul", [scores, "attn_scale"], f"{p}_scaled"), "causal"], f"{p}_masked")
        attn = node("MatMul", [node("Softmax", [scores], f"{p}_probs", axis=-1), heads["v"]], f"{p}_attn")
        merged = node("Reshape", [node("Transpose", [attn], f"{p}_attn_bshd", perm=[0, 2, 1, 3]), "merge_shape"],
                      f"{p}_attn_merged")
        h = node("Add", [h, node("MatMul", [merged, weight(f"{p}.o_proj", (c.dim, c.dim))], f"{p}_o")], f"{p}_h_attn")
        x = rms_norm(h, weight(f"{p}.mlp_norm", (c.dim,), "ones"), f"{p}_mlp_norm")
        gate = node("MatMul", [x, weight(f"{p}.gate_proj", (c.dim, c.ffn))], f"{p}_gate")
        up = node("MatMul", [x, weight(f"{p}.up_proj", (c.dim, c.ffn))], f"{p}_up")
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate], f"{p}_gate_sig")], f"{p}_silu"), up], f"{p}_swiglu")
        h = node("Add", [h, node("MatMul", [act, weight(f"{p}.down_proj", (c.ffn, c.dim))], f"{p}_down")], f"{p}_h")
    x = rms_norm(h, weight("final_norm", (c.dim,), "ones"), "final_norm")
    if c.tied:
        rows = node("Reshape", [x, const("rows_shape", np.array([-1, c.dim], np.int64))], "final_rows")
        flat = node("Gemm", [rows, embed], "logits_rows", transB=1)
        out_shape = node("Concat", [node("Slice", ["ids_shape", "zero", "two"], "batch_seq"),
                                    const("vocab_dim", np.array([c.vocab], np.int64))], "logits_shape", axis=0)
        nodes.append(helper.make_node("Reshape", [flat, out_shape], ["logits"], name="logits"))
    else:
        nodes.append(helper.make_node("MatMul", [x, weight("lm_head", (c.dim, c.vocab))], ["logits"], name="logits"))
    writer.close()
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                               ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    return path


ZIPF_SHIFT = 2.7  # Zipf-Mandelbrot offset: frequency of the token of rank r ~ 1 / (r + 2.7), as in English text


def token_feeds(path: str | Path, config: DecoderConfig, samples: int, seq: int, seed: int = 1,
                distribution: str = "zipf") -> Path:
    """Sample-major token ids ``(samples, 1, seq)`` saved as an .npz for --data / --calib.

    ``zipf``: drawn independently with the frequencies of words in text (Zipf-Mandelbrot; the ranks
    are a permutation of the vocabulary fixed by the model's seed, so every draw of one model shares
    its frequent tokens, as calibration and evaluation text do). ``uniform``: every id alike, which
    makes every layer's inputs nearly white, a distribution no text has.
    """
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        ids = rng.integers(0, config.vocab, (samples, 1, seq), dtype=np.int64)
    elif distribution == "zipf":
        weights = 1 / (np.arange(config.vocab) + ZIPF_SHIFT)
        ranks = rng.choice(config.vocab, (samples, 1, seq), p=weights / weights.sum())
        ids = np.random.default_rng(config.seed).permutation(config.vocab)[ranks].astype(np.int64)
    else:
        raise ValueError(f"distribution must be zipf or uniform, not {distribution!r}")
    np.savez(path, input_ids=ids)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    for field_name in ("vocab", "dim", "layers", "heads", "ffn", "max_seq", "seed"):
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=int, default=getattr(DecoderConfig, field_name))
    parser.add_argument("--tied", action="store_true")
    args = parser.parse_args()
    config = DecoderConfig(args.vocab, args.dim, args.layers, args.heads, args.ffn, args.max_seq, args.tied, args.seed)
    build_decoder(args.output, config)
    print(f"{args.output}: {config.parameters / 1e6:.1f}M parameters, {config.parameters * 4 / 2**30:.2f} GiB fp32")


if __name__ == "__main__":
    main()
