"""Embedding tables as integers (onnxopt.embeddings): runs in onnxruntime, equals the dequantized table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from conftest import make_model, tensor, value
from onnxopt.embeddings import dequantize_rows, quantize_embeddings, quantize_rows
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
    codes, scale = quantize_rows(table, bits, block_size)
    expected = np.maximum(dequantize_rows(codes, scale, block_size)[ids], 0)
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
def test_quantize_rows_error_is_at_most_half_a_step(rows, fmt, magnitude, seed):
    bits, block_size = fmt
    table = (np.random.default_rng(seed).standard_normal((rows, 32)) * magnitude).astype(np.float32)
    codes, scale = quantize_rows(table, bits, block_size)
    step = np.repeat(scale.reshape(rows, -1), block_size or 32, axis=1)
    assert np.all(np.abs(dequantize_rows(codes, scale, block_size) - table) <= step * 0.5001 + 1e-30)
