"""Synthetic validation feeds the model accepts: values and shapes read from the graph, tried in onnxruntime.

Random feeds are only useful when the model can run on them. The graph says part of what is valid:
an integer input that (through casts and reshapes) indexes a ``Gather`` must stay below the table's
size (token ids, token-type ids), and one compared by ``Equal`` with a constant (a sample rate that
picks an ``If`` branch) takes that constant. Symbolic dims other than the batch are first taken as 64
(room for a detector's downsampling; a sequence long enough for attention to mean something), then
larger (an audio model whose padding needs a long window), then 1. When nothing runs, the error says so and names the fixes: real samples with
``--data``, or shapes with ``--input-shape``.
"""

from __future__ import annotations

import numpy as np
import onnx

from .data import FeedSet, input_dims, model_inputs, random_feeds
from .errors import InputError
from .graph import STANDARD_DOMAINS, constant_tensor, walk_graphs
from .tensors import tensor_nbytes, tensor_to_array
from .validate import Session

# ops that pass an integer input's values on unchanged (only their layout or dtype changes)
VALUE_PRESERVING_OPS = frozenset({"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
                                  "Expand", "Tile", "Slice", "Concat"})
# sizes tried, in order, for symbolic dims that are not a batch axis; the first that runs is kept
SYMBOLIC_SIZES = (64, 512, 1)
_INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                            onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                            onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})


def integer_bounds(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """For integer inputs the graph constrains: ``(low, high)`` with high exclusive.

    An input that reaches the indices of a ``Gather`` over a constant table stays below the table's
    size along the gathered axis; one that reaches an ``Equal`` with a constant scalar takes that value.
    """
    constants: dict[str, onnx.TensorProto] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for graph in walk_graphs(model.graph):
        constants.update((t.name, t) for t in graph.initializer)
        for node in graph.node:
            tensor = constant_tensor(node)
            if tensor is not None:
                constants[node.output[0]] = tensor
            for name in node.input:
                readers.setdefault(name, []).append(node)
    bounds: dict[str, tuple[int, int]] = {}
    for value in model_inputs(model):
        if value.type.tensor_type.elem_type not in _INTEGER_TYPES:
            continue
        found = _bound(value.name, readers, constants)
        if found is not None:
            bounds[value.name] = found
    return bounds


def _bound(name: str, readers: dict[str, list[onnx.NodeProto]],
           constants: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """The tightest bound found by following ``name`` through value-preserving ops (each value once)."""
    high: int | None = None
    seen, stack = {name}, [name]
    while stack:
        current = stack.pop()
        for node in readers.get(current, ()):
            if node.domain not in STANDARD_DOMAINS:
                continue
            if node.op_type == "Equal":
                other = node.input[1] if node.input[0] == current else node.input[0]
                tensor = constants.get(other)
                scalar = tensor_to_array(tensor) if tensor is not None and tensor_nbytes(tensor) <= 8 else None
                if scalar is not None and scalar.size == 1 and scalar.dtype.kind in "iuf" and np.isfinite(scalar).all():
                    target = int(scalar.reshape(-1)[0])
                    return target, target + 1
            elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == current:
                table = constants.get(node.input[0])
                if table is not None and table.dims:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    size = int(table.dims[axis])
                    high = size if high is None else min(high, size)
            elif node.op_type in VALUE_PRESERVING_OPS and node.input and current in (
                    node.input if node.op_type == "Concat" else node.input[:1]):
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
    return None if high is None or high < 1 else (0, high)


def shape_layouts(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None):
    """Shapes to try for inputs with symbolic dims, each with its notes, best first.

    Batch dims (axis 0, or named like an axis-0 dim) are 1. Other symbolic dims take each of
    SYMBOLIC_SIZES in turn: a sequence of one token or an image of one pixel would hide what attention
    or pooling do, and a detector needs room to downsample. Each size is tried on every such dim, then
    on the last axis only (an unnamed dim elsewhere is often a batch too: an RNN state's ``[2, ?, 128]``).
    """
    given = dict(input_shapes or {})
    dims = {v.name: input_dims(v) or [] for v in model_inputs(model) if v.name not in given}
    symbolic = {name: [axis for axis, d in enumerate(ds) if not (isinstance(d, int) and d >= 0)]
                for name, ds in dims.items()}
    symbolic = {name: axes for name, axes in symbolic.items() if axes}
    if not symbolic:
        yield given, []
        return
    batch_names = {ds[0] for ds in dims.values() if ds and isinstance(ds[0], str)}
    for size in SYMBOLIC_SIZES:
        for last_only in (False, True) if size > 1 else (False,):
            shapes = {name: tuple(d if axis not in symbolic.get(name, ()) else
                                  1 if axis == 0 or d in batch_names or (last_only and axis < len(ds) - 1) else size
                                  for axis, d in enumerate(ds))
                      for name, ds in dims.items()}
            notes = [f"input '{name}': symbolic dims taken as "
                     + ", ".join(f"{dims[name][axis] or '?'}={shapes[name][axis]}" for axis in axes)
                     for name, axes in symbolic.items()]
            yield {**shapes, **given}, notes


def synthetic_reference(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    count: int = 4,
    seed: int = 0,
    **session_options,
) -> tuple[FeedSet, list[str], dict[str, list[np.ndarray]]]:
    """Random feeds the model runs on, notes on what was assumed, and the model's outputs on them
    (``session_options`` as for :class:`Session`, so that candidates run alike)."""
    bounds = integer_bounds(model)
    first_error: InputError | None = None
    tried = 0
    with Session(model, **session_options) as session:  # one session for every try: loading a big model once is enough
        for shapes, shape_notes in shape_layouts(model, input_shapes):
            tried += 1
            feeds, notes = random_feeds(model, count, seed, shapes, integer_bounds=bounds)
            try:
                outputs = session.run_all(feeds)
            except InputError as exc:
                first_error = first_error or exc
                continue
            if not all(np.isfinite(v).all() for values in outputs.values() for v in values
                       if isinstance(v, np.ndarray) and v.dtype.kind in "fc"):
                shape_notes.append("the original's outputs hold NaN or Inf on these random feeds: comparisons "
                                   "prove little there; pass real samples with --data")
            return feeds, notes + shape_notes, outputs
    layouts = f" (symbolic dims tried as {', '.join(map(str, SYMBOLIC_SIZES))})" if tried > 1 else ""
    inputs = ", ".join(f"{v.name}{list(d if d is not None else '?' for d in input_dims(v) or [])}"
                       for v in model_inputs(model))
    raise InputError(f"random feeds are not valid inputs for this model{layouts}: {first_error}. "
                     f"Pass real samples with --data, or the shapes it expects with --input-shape NAME=D1,D2,... "
                     f"(inputs: {inputs}); --no-validate skips onnxruntime") from None
