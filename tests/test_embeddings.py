"""Embedding tables as integers (onnxopt.embeddings): runs in onnxruntime, equals the dequantized table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import make_model, tensor, value
from onnxopt.blockquant import unpack_codes
from onnxopt.embeddings import quantize_embeddings, quantize_table
from onnxopt.graph import GraphIndex, WeightStore, unique_name_factory
from onnxopt.validate import Session


def embedding_model(rows=64, width=32, tied=False, seed=0) -> onnx.ModelProto:
    """ids[1,5] -> Gather(table) -> Relu (-> MatMul with the table transposed when tied)."""
    table = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Relu", ["e"], ["y"])]
    inits = [tensor("table", table)]
    outputs = [value("y", [1, 5, width])]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["tt"]), helper.make_node("MatMul", ["y", "tt"], ["logits"])]
        outputs.append(value("logits", [1, 5, rows]))
    return make_model(nodes, [value("ids", [1, 5], TensorProto.INT64)], outputs, inits)


def dequantized(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The table the symmetric grid stands for (codes less 2^(bits-1), times the block scale), and each
    value's step, recomputed here from the packed codes."""
    rows, width = table.shape
    q = quantize_table(table, bits, block_size)
    block = block_size or width
    codes = unpack_codes(q.b.reshape(rows, -1), bits, width).reshape(rows, -1, block).astype(np.float64)
    values = (codes - (1 << (bits - 1))) * q.scales[:, :, None]
    step = np.broadcast_to(np.abs(q.scales[:, :, None]), values.shape)
    return values.reshape(rows, width), step.reshape(rows, width)


def rewrite(model, **kwargs):
    stats: dict = {}
    rows = quantize_embeddings(model, model.graph, GraphIndex(model.graph), WeightStore(model.graph),
                               unique_name_factory(model), stats, min_elements=1, **kwargs)
    return stats, rows


@pytest.mark.parametrize("bits,block_size", [(8, 0), (8, 16), (4, 16), (4, 32)])
def test_gathered_rows_equal_the_dequantized_table(bits, block_size):
    model = embedding_model()
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    stats, rows = rewrite(model, bits=bits, block_size=block_size)
    onnx.checker.check_model(model)
    assert stats["embeddings_quantized"] == 1 and rows[0]["params"] == table.size
    assert not any(n.op_type == "Gather" and n.input[0] == "table" for n in model.graph.node)
    ids = np.array([[0, 5, 63, 5, 17]], np.int64)
    with Session(model) as s:
        got = s.run({"ids": ids}, ["y"])["y"]
    expected = np.maximum(dequantized(table, bits, block_size)[0][ids], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # the error is that of the format: small at 8 bits, bounded by half a step at 4
    assert rows[0]["weight_rel_err"] < (0.01 if bits == 8 else 0.15)
    stored = sum(t.ByteSize() for t in model.graph.initializer)
    per_value = bits / 8 + (4 + (1 if block_size else 0)) / (block_size or table.shape[1])  # codes, scale, zero point
    assert stored <= table.size * per_value + 200  # + names and headers


def test_table_shared_with_a_matmul_stays_float():
    model = embedding_model(tied=True)
    before = model.SerializeToString()
    stats, rows = rewrite(model, bits=8)
    assert rows == [] and stats == {"skipped_embedding_shared_with_other_ops": 1}
    assert model.SerializeToString() == before


def test_block_size_that_does_not_divide_the_row_is_skipped():
    model = embedding_model(width=48)
    stats, _ = rewrite(model, bits=4, block_size=32)
    assert stats == {"skipped_embedding_block_size_not_dividing_row": 1}


def test_bad_format_is_refused():
    with pytest.raises(ValueError, match="need a block_size"):
        rewrite(embedding_model(), bits=4, block_size=0)
    with pytest.raises(ValueError, match="power of two"):
        rewrite(embedding_model(), bits=8, block_size=24)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.sampled_from([(8, 0), (8, 16), (4, 16)]), st.floats(1e-3, 1e3), st.integers(0, 1 << 30))
def test_table_error_is_at_most_half_a_step_inside_the_grid(rows, fmt, magnitude, seed):
    """Round to nearest on blockquant's symmetric grid: the value of largest magnitude is a code exactly;
    the other side ends one code short (2^(bits-1) - 1 steps), so a value beyond it is off by at most a step."""
    bits, block_size = fmt
    table = (np.random.default_rng(seed).standard_normal((rows, 32)) * magnitude).astype(np.float32)
    values, step = dequantized(table, bits, block_size)
    error = np.abs(values - table)
    inside = np.abs(table) <= step * ((1 << (bits - 1)) - 1)
    assert np.all(error[inside] <= step[inside] * 0.5001 + 1e-30)
    assert np.all(error <= step * 1.0001 + 1e-30)


@pytest.mark.parametrize("bits,block_size", [(8, 16), (4, 16)])
def test_quantize_and_quantize_weights_write_the_same_table(bits, block_size):
    """One implementation: quantize's embedding rewrite and quantize-weights (symmetric, minmax grid) store
    the same GatherBlockQuantized data and scales."""
    from onnxopt.passes.base import PassContext
    from onnxopt.passes.quantize_weights import QuantizeWeights

    mine = embedding_model()
    rewrite(mine, bits=bits, block_size=block_size)
    options = QuantizeWeights.Options(bits=bits, block_size=block_size, symmetric=True, grid="minmax")
    theirs = QuantizeWeights(options, PassContext())(embedding_model()).model
    tables = []
    for model in (mine, theirs):
        node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        inits = {t.name: t for t in model.graph.initializer}
        tables.append((inits[node.input[0]].data_type, inits[node.input[0]].raw_data,
                       onnx.numpy_helper.to_array(inits[node.input[2]]).tobytes(), len(node.input)))
    assert tables[0] == tables[1]
