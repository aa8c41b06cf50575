"""Synthetic validation feeds the model accepts: values and shapes read from the graph, tried in onnxruntime.

Random feeds are only useful when the model can run on them. The graph says part of what is valid:
an integer input that (through casts and reshapes) indexes a ``Gather`` must stay below the table's
size (token ids, token-type ids), and one compared by ``Equal`` with a constant (a sample rate that
picks an ``If`` branch) takes that constant. Symbolic dims are first taken as 1; when the model cannot
run on that (a detector that downsamples by 32, an audio model whose padding needs a long window),
larger sizes are tried. When nothing runs, the error says so and names the fixes: real samples with
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
SYMBOLIC_SIZES = (1, 64, 512)


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


_INTEGER_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                            onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                            onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})


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
                if tensor is not None and tensor_nbytes(tensor) <= 8 and np.size(tensor_to_array(tensor)) == 1:
                    target = int(tensor_to_array(tensor).reshape(-1)[0])
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
    """Shapes to try for inputs with symbolic dims, and a note for each: all 1 first; then each of
    SYMBOLIC_SIZES for every non-batch dim (a batch dim is on axis 0 or named like one), and for the
    last axis only (unnamed dims elsewhere are often a batch too: an RNN state's ``[2, ?, 128]``)."""
    given = dict(input_shapes or {})
    dims = {v.name: input_dims(v) or [] for v in model_inputs(model) if v.name not in given}
    symbolic = {name: [axis for axis, d in enumerate(ds) if not (isinstance(d, int) and d >= 0)]
                for name, ds in dims.items()}
    symbolic = {name: axes for name, axes in symbolic.items() if axes}
    batch_names = {ds[0] for ds in dims.values() if ds and isinstance(ds[0], str)}
    yield given, []
    if not symbolic:
        return
    for size in SYMBOLIC_SIZES[1:]:
        for last_only in (False, True):
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
) -> tuple[FeedSet, list[str], dict[str, list[np.ndarray]]]:
    """Random feeds the model runs on, notes on what was assumed, and the model's outputs on them."""
    bounds = integer_bounds(model)
    first_error: InputError | None = None
    tried = 0
    with Session(model) as session:  # one session for every try: loading a big model once is enough
        for shapes, shape_notes in shape_layouts(model, input_shapes):
            tried += 1
            feeds, notes = random_feeds(model, count, seed, shapes, integer_bounds=bounds)
            try:
                return feeds, notes + shape_notes, session.run_all(feeds)
            except InputError as exc:
                first_error = first_error or exc
    layouts = f" (symbolic dims tried as 1, then {' and '.join(map(str, SYMBOLIC_SIZES[1:]))})" if tried > 1 else ""
    inputs = ", ".join(f"{v.name}{list(d if d is not None else '?' for d in input_dims(v) or [])}"
                       for v in model_inputs(model))
    raise InputError(f"random feeds are not valid inputs for this model{layouts}: {first_error}. "
                     f"Pass real samples with --data, or the shapes it expects with --input-shape NAME=D1,D2,... "
                     f"(inputs: {inputs}); --no-validate skips onnxruntime") from None
