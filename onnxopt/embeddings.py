"""Embedding tables as integers: the Gather reads a quantized table, only the gathered rows are dequantized.

A vocabulary table is most of a small transformer's file (MiniLM: 11.7M of 17.1M parameters) and
a Gather reads a handful of its rows, so the table is stored as integers and the few gathered rows
are turned back into float after the Gather. The grid is :mod:`onnxopt.blockquant`'s, the one
``MatMulNBits`` weights use: a table ``(V, D)`` is the ``(N, K)`` form of a weight, blocks along a row.

- ``bits=8, block_size=0``: int8 per row (one block the width of the row, symmetric), in standard ONNX
  ops any runtime has: ``Gather(int8 table) -> Cast -> Mul(Gather(row scales))``, the scales stored ``(V, 1)``
  so that the gathered ones broadcast over the row as they are (no Unsqueeze node: one node less on every run).
- ``block_size > 0`` (bits 4 or 8): onnxruntime's ``com.microsoft.GatherBlockQuantized``, one scale
  (and, asymmetric, one zero point) per ``block_size`` values of a row: :func:`table_data`,
  :func:`table_zero_points` and
  :func:`gather_block_quantized`, which the weight-only quantizer uses for its tables too (a tied table
  there takes its LM head's codes and scales).

:func:`quantize_embeddings` is the int8 ``quantize`` pass's rewrite: a table qualifies when it is a
float32 2-D constant that only ``Gather(axis=0)`` nodes read (a tied LM head that also multiplies by
it is skipped and counted: it needs the float, or the weight-only form), symmetric, with
``block_size`` a power of two >= 16 dividing the row.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .blockquant import NBitsWeight, pack_codes, quantize_for_nbits, unpack_codes
from .graph import GraphIndex, WeightStore, replace_nodes

MS_DOMAIN = "com.microsoft"
DEFAULT_MIN_ELEMENTS = 1 << 14  # smaller tables (position, token-type embeddings) are not worth the nodes


def quantize_table(table: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                   grid: str = "minmax") -> NBitsWeight:
    """A ``(V, D)`` table on the block grid, blocks of ``block_size`` values along each row (0: the whole row)."""
    return quantize_for_nbits(table.T, bits, block_size or table.shape[1], symmetric, grid)


def row_codes(q: NBitsWeight) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes ``(V, D)`` and scales ``(V,)`` of a symmetric 8-bit table quantized per row (zero point 0)."""
    return (q.b.reshape(q.n, q.k) ^ np.uint8(0x80)).view(np.int8), q.scales[:, 0]


def table_data(q: NBitsWeight, symmetric: bool, name: str) -> onnx.TensorProto:
    """GatherBlockQuantized's ``data`` ``(V, D)`` of a table in ``MatMulNBits`` form. 4-bit: int4 (symmetric: the
    codes less 8, zero point 0) or uint4; 8-bit: uint8 (symmetric: zero point 128, the op's default for uint8)."""
    vocab, width = q.n, q.k
    if q.bits == 4:
        codes = unpack_codes(q.b.reshape(vocab, -1), 4, width)
        if symmetric:
            data_type, codes = onnx.TensorProto.INT4, (codes.astype(np.int8) - 8).astype(np.uint8) & 0xF
        else:
            data_type = onnx.TensorProto.UINT4
        data_bytes = pack_codes(codes.reshape(-1), 4).tobytes()
    else:
        data_type, data_bytes = onnx.TensorProto.UINT8, q.b.reshape(vocab, -1)[:, :width].tobytes()
    return helper.make_tensor(name, data_type, [vocab, width], data_bytes, raw=True)


def table_zero_points(q: NBitsWeight, name: str) -> onnx.TensorProto:
    """GatherBlockQuantized's ``zero_points`` ``(V, blocks)`` of an asymmetric table, in its data's type."""
    blocks = q.scales.shape[1]
    zero = unpack_codes(q.zero_points, q.bits, blocks)
    if q.bits == 4:
        return helper.make_tensor(name, onnx.TensorProto.UINT4, [q.n, blocks], pack_codes(zero.reshape(-1), 4).tobytes(),
                                  raw=True)
    return helper.make_tensor(name, onnx.TensorProto.UINT8, [q.n, blocks], zero.tobytes(), raw=True)


def gather_block_quantized(data: str, ids: str, scales: str, zero_points: str | None, outputs: list[str], name: str,
                           bits: int, block_size: int) -> onnx.NodeProto:
    """The ``GatherBlockQuantized`` node that reads :func:`table_data`'s tables (rows gathered along axis 0)."""
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": block_size}
    if bits == 8:
        attrs["bits"] = 8
    inputs = [data, ids, scales, *([zero_points] if zero_points else [])]
    return helper.make_node("GatherBlockQuantized", inputs, outputs, domain=MS_DOMAIN, name=name, **attrs)


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
    replacements: dict[int, list[onnx.NodeProto]] = {}
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
        replacements[i] = _gather_nodes(node, written[table_name], make_name, bits, block_size)
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
    """Replace the float table by its integer codes where it lives; the scales beside it."""
    table = store.array(table_name)
    q = quantize_table(table, bits, block_size)
    stored = make_name(f"{table_name}_q{bits}")
    scale_name = make_name(f"{table_name}_scale")
    if block_size:
        tensor = table_data(q, True, stored)
        scale = q.scales
    else:
        codes, scale = row_codes(q)
        tensor, scale = numpy_helper.from_array(codes, stored), scale[:, None]  # (V, 1): gathered, they broadcast
    if store.is_constant_node(table_name):
        node = index.producer_node(table_name)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", tensor))
        node.output[0] = stored
    else:
        store.tensor(table_name).CopyFrom(tensor)
    store.add_initializer(scale_name, scale)
    layout = f"int{bits} per {block_size} values" if block_size else "int8 per row"
    error = float(np.sqrt(q.sq_error / q.sq_norm)) if q.sq_norm else 0.0
    return (stored, scale_name, None), {"name": table_name, "kind": "embedding", "shape": list(table.shape),
                                         "format": layout, "params": int(table.size), "weight_rel_err": error}


def _gather_nodes(node: onnx.NodeProto, table: tuple[str, str, str | None], make_name, bits: int,
                  block_size: int) -> list[onnx.NodeProto]:
    """The nodes that replace one Gather: same indices in, same float rows out."""
    codes, scale, zero_point = table
    ids, out = node.input[1], node.output[0]
    if block_size:
        return [gather_block_quantized(codes, ids, scale, zero_point, [out], node.name, bits, block_size)]
    rows, row_scale, as_float = (make_name(f"{out}_{part}") for part in ("q", "scale", "float"))
    return [onnx.helper.make_node("Gather", [codes, ids], [rows], name=node.name),
            onnx.helper.make_node("Gather", [scale, ids], [row_scale]),
            onnx.helper.make_node("Cast", [rows], [as_float], to=onnx.TensorProto.FLOAT),
            onnx.helper.make_node("Mul", [as_float, row_scale], [out])]
