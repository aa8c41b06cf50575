"""Tensor values whether stored inline or as external data, and a spill file for big rewritten tensors.

A model loaded from external data stays lazy: its tensors are read from disk on demand, and a
tensor a pass rewrites goes to a process-wide spill file instead of into memory. So the in-memory
model never holds the weights of a big model, and saving only copies bytes between files; when
the spill file holds most of what the final save writes, that save appends the rest to it and
moves it to the output's data file (:meth:`SpillFile.publish`), so rewritten weights are written once.
"""

from __future__ import annotations

import atexit
import ctypes
import math
import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError

ALIGNMENT = 4096  # data offsets aligned for mmap-friendly loading in onnxruntime
COPY_CHUNK = 64 * 2**20


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                         onnx.TensorProto.DOUBLE})


# data type -> (unsigned view, exponent bits, mantissa bits) of its IEEE-style bit pattern
SUBNORMAL_LAYOUTS = {
    onnx.TensorProto.FLOAT: (np.uint32, 0x7F800000, 0x007FFFFF),
    onnx.TensorProto.BFLOAT16: (np.uint16, 0x7F80, 0x007F),
    onnx.TensorProto.DOUBLE: (np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
}


def flush_subnormal_values(array: np.ndarray, data_type: int) -> tuple[np.ndarray, int]:
    """``array`` with its subnormal values replaced by a zero of the same sign, and how many there were.

    Returns ``array`` itself (untouched) when it holds none; otherwise a writable array (the input
    when it was writable and contiguous, else a copy).
    """
    view_type, exponent, mantissa = SUBNORMAL_LAYOUTS[data_type]
    bits = np.ascontiguousarray(array).view(view_type)
    magnitude_less_one = bits & view_type(exponent | mantissa)
    magnitude_less_one -= view_type(1)  # +-0 wraps around to the largest value
    subnormal = magnitude_less_one < view_type(mantissa)  # magnitude in 1 .. mantissa: exponent 0, mantissa not
    flushed = int(np.count_nonzero(subnormal))
    if not flushed:
        return array, 0
    if not bits.flags.writeable:
        bits = bits.copy()
    bits[subnormal] &= ~view_type(exponent | mantissa)  # only the sign bit stays
    return bits.view(array.dtype).reshape(array.shape), flushed


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


def tensor_to_array(tensor: onnx.TensorProto, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor's values; external data is read from its (absolute, in memory) location.

    ``out``: a flat array of the tensor's dtype and size that external data is read into (a caller
    going through many big tensors reuses one buffer instead of a fresh allocation per tensor).
    """
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        if out is None:
            data = np.fromfile(f, dtype=dtype, count=count)
        else:
            data = out if out.dtype == dtype and out.size == count else np.empty(count, dtype)
            data = data[: f.readinto(data.view(np.uint8)) // data.itemsize]
    if data.size != count:
        raise InputError(f"external data of tensor '{tensor.name}' in {info['location']} is truncated "
                         f"({data.size} of {count} values)")
    return data.reshape(tuple(tensor.dims))


def count_zeros(tensor: onnx.TensorProto, chunk_bytes: int = 4 * 2**20) -> int:
    """How many of the tensor's values are zero; external data is read in chunks into one small buffer
    (a multi-GB model's weights are never held, nor a fresh array allocated per tensor)."""
    if not is_external(tensor):
        return int(np.count_nonzero(tensor_to_array(tensor) == 0))
    info = external_info(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    remaining = int(np.prod(tensor.dims, dtype=np.int64))
    buffer = np.empty(max(1, min(remaining, chunk_bytes // dtype.itemsize)), dtype)
    zeros = 0
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while remaining:
            part = buffer[: min(remaining, buffer.size)]
            read = f.readinto(part.view(np.uint8)) // dtype.itemsize
            if read < part.size:
                raise InputError(f"external data of tensor '{tensor.name}' in {info['location']} is truncated")
            zeros += int(np.count_nonzero(part == 0))
            remaining -= read
    return zeros


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


def copy_external_bytes(tensor: onnx.TensorProto, out) -> int:
    """Append an external tensor's bytes to the open binary file ``out``; the length copied.

    The kernel copies file to file (``copy_file_range``) where it can: no buffer in this process.
    """
    info = external_info(tensor)
    length = int(info.get("length", tensor_nbytes(tensor)))
    offset, remaining = int(info.get("offset", 0)), length
    out.flush()
    with open(info["location"], "rb") as src:
        try:
            while remaining:
                copied = os.copy_file_range(src.fileno(), out.fileno(), remaining, offset + length - remaining)
                if not copied:
                    break
                remaining -= copied
        except (AttributeError, OSError):  # no copy_file_range here, or not between these files
            out.seek(0, os.SEEK_END)
            src.seek(offset + length - remaining)
            while remaining:
                chunk = src.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    break
                out.write(chunk)
                remaining -= len(chunk)
    if remaining:
        raise InputError(f"external data of tensor '{tensor.name}' ends early in {info['location']}")
    return length


def _sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, without waiting (Linux ``sync_file_range``;
    nothing elsewhere). A spill file that becomes an output is synced when published: written back
    while the passes still compute, that sync then waits for little instead of for every byte."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class SpillFile:
    """An append-only temporary file (deleted at exit) that holds rewritten external tensors.

    Tensors start at multiples of ``ALIGNMENT``, as in a saved data file, so that the file itself
    can become one (:meth:`publish`); the next append then starts a new file.
    """

    def __init__(self) -> None:
        self._file = None
        self.path: str | None = None
        self._registered = False

    def _open(self):
        if self._file is None:
            fd, path = tempfile.mkstemp(prefix="onnxopt-spill-", suffix=".data")
            self._file = os.fdopen(fd, "w+b")
            self.path = path
            if not self._registered:
                atexit.register(self.close)
                self._registered = True
        return self._file

    def append(self, tensor: onnx.TensorProto, data: bytes | memoryview) -> None:
        file = self._open()
        offset = self._pad(file)
        file.write(data)
        file.flush()
        start_writeback(file.fileno(), offset, len(data))
        del tensor.external_data[:]
        set_external_location(tensor, self.path, offset, len(data))

    def copy_in(self, tensor: onnx.TensorProto) -> None:
        """Append the bytes of a tensor stored in another file; the tensor then points here."""
        file = self._open()
        offset = self._pad(file)
        length = copy_external_bytes(tensor, file)
        set_external_location(tensor, self.path, offset, length)

    @staticmethod
    def _pad(file) -> int:
        offset = file.seek(0, os.SEEK_END)
        if offset % ALIGNMENT:
            file.write(b"\0" * (-offset % ALIGNMENT))
            offset += -offset % ALIGNMENT
        return offset

    def holds(self, tensor: onnx.TensorProto) -> bool:
        return self._file is not None and is_external(tensor) and external_info(tensor).get("location") == self.path

    def size(self) -> int:
        return 0 if self._file is None else os.fstat(self._file.fileno()).st_size

    def publish(self, target: str | os.PathLike, mode: int) -> None:
        """Move the current file to ``target`` (atomically replacing it; the same filesystem), synced to
        disk first as any written output, with the output's file ``mode``; the next append starts a new file."""
        file = self._file
        file.flush()
        os.fchmod(file.fileno(), mode)
        os.fsync(file.fileno())
        os.replace(self.path, target)
        file.close()
        self._file = self.path = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.unlink(self.path)
            self._file = self.path = None


SPILL = SpillFile()
