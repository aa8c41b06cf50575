"""Embedding tables as integers: the Gather reads a quantized table, only the gathered rows are dequantized.

A vocabulary table is most of a small transformer's file (MiniLM: 11.7M of 17.1M parameters) and
a Gather reads a handful of its rows, so the table is stored as integers and the few gathered rows
are turned back into float after the Gather:

- ``bits=8, block_size=0``: symmetric int8 per row, in standard ONNX ops any runtime has:
  ``Gather(int8 table) -> Cast -> Mul(Unsqueeze(Gather(row scales)))``.
- ``block_size > 0`` (bits 4 or 8): onnxruntime's ``com.microsoft.GatherBlockQuantized``, one
  scale per ``block_size`` values of a row (uint8 storage, two 4-bit values per byte, zero point
  8 or 128: the values are symmetric). ``block_size`` must be a power of two >= 16 dividing the row.

Shared by the int8 ``quantize`` pass and the weight-only quantizer. A table qualifies when it is a
float32 2-D constant that only ``Gather(axis=0)`` nodes read (a tied LM head that also multiplies
by it is skipped and counted: it needs the float, or its own weight-only form).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, WeightStore, replace_nodes

MS_DOMAIN = "com.microsoft"
DEFAULT_MIN_ELEMENTS = 1 << 14  # smaller tables (position, token-type embeddings) are not worth the nodes


def quantize_rows(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer codes (int8 values in [-(2^(bits-1)-1), 2^(bits-1)-1]) and float32 scales,
    one per row (``block_size=0``) or per ``block_size`` values of a row."""
    qmax = (1 << (bits - 1)) - 1
    rows, width = table.shape
    blocks = table.reshape(rows, -1, block_size or width)
    absmax = np.abs(blocks).max(axis=2)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.round(blocks / scale[:, :, None]), -qmax, qmax).astype(np.int8).reshape(rows, width)
    return codes, scale if block_size else scale[:, 0]


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """The float table that :func:`quantize_rows`' codes and scales stand for."""
    rows, width = codes.shape
    shaped = scale.reshape(rows, -1, 1)
    return (codes.reshape(rows, -1, block_size or width) * shaped).reshape(rows, width).astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """GatherBlockQuantized storage: uint8 offset by 2^(bits-1); 4-bit pairs packed low nibble first."""
    shifted = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return shifted
    if shifted.shape[-1] % 2:
        shifted = np.concatenate([shifted, np.full((*shifted.shape[:-1], 1), 8, np.uint8)], axis=-1)
    return shifted[..., 0::2] | (shifted[..., 1::2] << 4)


def table_problem(table: onnx.TensorProto | None, bits: int, block_size: int, min_elements: int) -> str | None:
    """Why a Gather's data operand cannot be quantized (a ``skipped_`` counter name), or None."""
    if table is None:
        return "embedding_not_constant"
    if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
        return "embedding_not_2d_float32"
    if table.dims[0] * table.dims[1] < min_elements:
        return "embedding_small"
    if block_size and table.dims[1] % block_size:
        return "embedding_block_size_not_dividing_row"
    return None


def check_format(bits: int, block_size: int) -> str | None:
    """What is wrong with a table format (None: it can be written)."""
    if bits not in (4, 8):
        return f"embedding bits must be 4 or 8, not {bits}"
    if block_size == 0 and bits != 8:
        return "4-bit embeddings need a block_size (GatherBlockQuantized): per-row scales are int8 only"
    if block_size and (block_size < 16 or block_size & (block_size - 1)):
        return f"embedding block_size must be a power of two >= 16 (GatherBlockQuantized), not {block_size}"
    return None


def quantize_embeddings(model: onnx.ModelProto, graph: onnx.GraphProto, index: GraphIndex, store: WeightStore,
                        make_name, stats: dict, *, bits: int = 8, block_size: int = 0,
                        min_elements: int = DEFAULT_MIN_ELEMENTS, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """Rewrite every qualifying ``Gather(table, ids)`` of ``graph`` (in place, one pass over the nodes).

    ``index`` and ``store`` are of ``graph`` as given. Counters go into ``stats``
    (``embeddings_quantized``, ``embedding_params``, ``skipped_embedding_<reason>``); the return
    value is one row per rewritten table for the report (name, shape, format, relative error).
    """
    problem = check_format(bits, block_size)
    if problem:
        raise ValueError(problem)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    axes = ""  # Unsqueeze axes [-1] (opset >= 13), one initializer for all tables
    written: dict[str, tuple[str, str, str | None]] = {}  # table -> (codes, scales, zero points)
    rows: list[dict] = []
    for i, node in enumerate(index.nodes):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.name in exclude:
            continue
        table_name = node.input[0]
        if table_name in index.producer and not store.is_constant_node(table_name):
            continue  # an activation being gathered: not a table
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        reason = "embedding_axis" if axis != 0 else table_problem(
            store.tensor(table_name) if table_name in store else None, bits, block_size, min_elements)
        if reason is None and any(c.op_type != "Gather" for c in index.consumer_nodes(table_name)):
            reason = "embedding_shared_with_other_ops"
        if reason is None and index.is_graph_output(table_name):
            reason = "embedding_is_graph_output"
        if reason:
            stats[f"skipped_{reason}"] = stats.get(f"skipped_{reason}", 0) + 1
            continue
        if table_name not in written:
            written[table_name], row = _write_table(graph, index, store, make_name, table_name, bits, block_size)
            rows.append(row)
        if not axes and opset >= 13 and not block_size:
            axes = make_name("embedding_scale_axes")
            store.add_initializer(axes, np.array([-1], np.int64))
        replacements[i] = _gather_nodes(node, written[table_name], make_name, bits, block_size, axes)
    if not replacements:
        return rows
    if block_size and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(index.nodes):
        nodes.extend(replacements.get(i, (node,)))
    replace_nodes(graph, nodes)
    stats["embeddings_quantized"] = stats.get("embeddings_quantized", 0) + len(written)
    stats["embedding_params"] = stats.get("embedding_params", 0) + sum(r["params"] for r in rows)
    return rows


def _write_table(graph, index: GraphIndex, store: WeightStore, make_name, table_name: str, bits: int,
                 block_size: int) -> tuple[tuple[str, str, str | None], dict]:
    """Replace the float table by its integer codes where it lives; scales (and zero points) beside it."""
    table = store.array(table_name)
    codes, scale = quantize_rows(table, bits, block_size)
    error = float(np.linalg.norm(dequantize_rows(codes, scale, block_size) - table) / max(np.linalg.norm(table), 1e-30))
    stored = make_name(f"{table_name}_q{bits}")
    tensor = numpy_helper.from_array(_pack(codes, bits) if block_size else codes, stored)
    if store.is_constant_node(table_name):
        node = index.producer_node(table_name)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", tensor))
        node.output[0] = stored
    else:
        store.tensor(table_name).CopyFrom(tensor)
    scale_name = make_name(f"{table_name}_scale")
    store.add_initializer(scale_name, scale)
    zero_name = None
    if block_size:
        zero_name = make_name(f"{table_name}_zero_point")
        store.add_initializer(zero_name, _pack(np.zeros(scale.shape, np.int8), bits))
    layout = f"int{bits} per {block_size} values" if block_size else "int8 per row"
    return (stored, scale_name, zero_name), {"name": table_name, "kind": "embedding", "shape": list(table.shape),
                                              "format": layout, "params": int(table.size), "weight_rel_err": error}


def _gather_nodes(node: onnx.NodeProto, table: tuple[str, str, str | None], make_name, bits: int, block_size: int,
                  axes: str) -> list[onnx.NodeProto]:
    """The nodes that replace one Gather: same indices in, same float rows out (``axes``: the Unsqueeze
    axes input; empty below opset 13, where axes are an attribute)."""
    codes, scale, zero_point = table
    ids, out = node.input[1], node.output[0]
    if block_size:
        return [onnx.helper.make_node("GatherBlockQuantized", [codes, ids, scale, zero_point], [out], name=node.name,
                                      domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size,
                                      bits=bits)]
    rows, row_scale, shaped, as_float = (make_name(f"{out}_{part}") for part in ("q", "scale", "scale_col", "float"))
    unsqueeze = (onnx.helper.make_node("Unsqueeze", [row_scale, axes], [shaped]) if axes
                 else onnx.helper.make_node("Unsqueeze", [row_scale], [shaped], axes=[-1]))
    return [onnx.helper.make_node("Gather", [codes, ids], [rows], name=node.name),
            onnx.helper.make_node("Gather", [scale, ids], [row_scale]),
            unsqueeze,
            onnx.helper.make_node("Cast", [rows], [as_float], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [as_float, shaped], [out])]
