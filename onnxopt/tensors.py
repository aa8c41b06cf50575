"""Tensor values whether stored inline or as external data, and a spill file for big rewritten tensors.

A model loaded from external data stays lazy: its tensors are read from disk on demand, and a
tensor a pass rewrites goes to a process-wide spill file instead of into memory. So the in-memory
model never holds the weights of a big model, and saving only copies bytes between files.
"""

from __future__ import annotations

import atexit
import math
import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = math.prod(tensor.dims)  # not np.prod: a piece of a model has many small tensors to size
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def set_external_location(tensor: onnx.TensorProto, location: str, offset: int | None = None,
                          length: int | None = None) -> None:
    entries = external_info(tensor)
    entries["location"] = location
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; external data is read from its (absolute, in memory) location."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = math.prod(tensor.dims)  # not np.prod: a piece of a model has many small tensors to size
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise InputError(f"external data of tensor '{tensor.name}' in {info['location']} is truncated "
                         f"({data.size} of {count} values)")
    return data.reshape(tuple(tensor.dims))


def set_tensor_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values (and shape) in place, keeping its name; external tensors stay external."""
    array = np.require(array, requirements="C")  # keeps 0-d arrays 0-d (scalars stay scalars)
    if not is_external(tensor):
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        return
    header = numpy_helper.from_array(array.reshape(-1)[:0], tensor.name)
    header.ClearField("dims")
    header.dims.extend(array.shape)
    tensor.CopyFrom(header)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    SPILL.append(tensor, memoryview(array).cast("B"))  # the array's own bytes, not a copy


def spill_tensor(tensor: onnx.TensorProto) -> None:
    """Move an inline tensor's bytes to the spill file: the in-memory model keeps only its header."""
    raw = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    SPILL.append(tensor, raw)


class SpillFile:
    """An append-only temporary file (deleted at exit) that holds rewritten external tensors."""

    def __init__(self) -> None:
        self._file = None

    def append(self, tensor: onnx.TensorProto, data: bytes | memoryview) -> None:
        if self._file is None:
            fd, path = tempfile.mkstemp(prefix="onnxopt-spill-", suffix=".data")
            self._file = os.fdopen(fd, "w+b")
            self.path = path
            atexit.register(self.close)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._file.flush()
        del tensor.external_data[:]
        set_external_location(tensor, self.path, offset, len(data))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.unlink(self.path)
            self._file = None


SPILL = SpillFile()
