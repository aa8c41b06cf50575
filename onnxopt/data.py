"""Feeds for validation and calibration: .npz files, ONNX test-data folders, Python data, or seeded random.

The sample-major convention everywhere: an array's first axis indexes samples and sample ``i`` is
fed as ``{name: arr[i]}`` (so each sample keeps the model's own batch axis).

Arrays in an ``.npz`` stay on disk: :class:`StoredRows` reads the rows a run needs when it needs
them, so memory does not grow with the number of samples: ``np.savez`` members by offset,
``np.savez_compressed`` ones over INFLATE_WHOLE_BYTES by decompressing forward (smaller ones are
loaded once: every pass over the data would decompress them again).
"""

from __future__ import annotations

import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError

Feed = dict[str, np.ndarray]


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed (initializers listed as inputs are optional)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


CHECK_BYTES = 16 << 20  # FeedSet.check reads stored rows in chunks of about this size
INFLATE_WHOLE_BYTES = 64 << 20  # compressed .npz members up to this size are loaded whole


class _FileBytes:
    """Bytes of an uncompressed member, at ``offset`` in the file: any range is one seek and read.

    ``info`` is the member's zip entry and ``header_start`` where its .npy header begins: the member's
    CRC covers header and data (:meth:`StoredRows.scan` checks it).
    """

    def __init__(self, path: Path, offset: int, info: zipfile.ZipInfo, header_start: int) -> None:
        self.path, self.offset, self.info, self.header_start = path, offset, info, header_start

    def header_crc(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.header_start)
            return zlib.crc32(f.read(self.offset - self.header_start))

    def read_into(self, at: int, buffer: memoryview) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset + at)
            return f.readinto(buffer)


class _DeflatedBytes:
    """Bytes of a compressed member after its ``skip`` header bytes: a read at or after the last one
    continues the open stream (calibration and validation read forward); an earlier one reopens it."""

    def __init__(self, path: Path, member: str, skip: int) -> None:
        self.path, self.member, self.skip = path, member, skip
        self._archive: zipfile.ZipFile | None = None
        self._stream = None
        self._at = 0

    def read_into(self, at: int, buffer: memoryview) -> int:
        try:
            if self._stream is None or at < self._at:
                self.close()
                self._archive = zipfile.ZipFile(self.path)
                self._stream = self._archive.open(self.member)
                self._stream.seek(self.skip)
                self._at = 0
            if at > self._at:
                self._stream.seek(self.skip + at)  # decompresses forward
            got = self._stream.readinto(buffer)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # found only now: the member is read lazily
            raise InputError(f"{self.path}: damaged ({exc})") from None
        self._at = at + got
        return got

    def close(self) -> None:
        if self._archive is not None:
            self._stream.close()
            self._archive.close()
            self._archive = self._stream = None

    __del__ = close


class StoredRows:
    """Rows ``[start, stop)`` of a C-ordered array in an .npz member, read from the file on demand.

    Indexing with an integer or a unit-step slice reads those rows (a new array); :meth:`window`
    narrows the range without reading. Nothing is cached.
    """

    def __init__(self, source: _FileBytes | _DeflatedBytes, dtype: np.dtype, shape: tuple[int, ...],
                 start: int = 0, stop: int | None = None) -> None:
        self.source, self.dtype, self.full_shape = source, dtype, shape
        self.start, self.stop = start, shape[0] if stop is None else stop
        self.row_bytes = dtype.itemsize * math.prod(shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.full_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.full_shape)

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, stop: int) -> StoredRows:
        start, stop, _ = slice(start, stop).indices(len(self))
        return StoredRows(self.source, self.dtype, self.full_shape, self.start + start, self.start + max(start, stop))

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return self._read(self.start + start, self.start + max(start, stop))
        if isinstance(key, (int, np.integer)):
            row = range(self.start, self.stop)[key]  # IndexError past the end, negative from the end
            return self._read(row, row + 1)[0]
        return np.asarray(self)[key]

    def scan(self) -> bool:
        """Read every row once, in chunks of about CHECK_BYTES: False if a float holds NaN or Inf.
        Over a whole uncompressed member the CRC is checked too (rows are otherwise read unchecked)."""
        whole = isinstance(self.source, _FileBytes) and (self.start, self.stop) == (0, self.full_shape[0])
        crc = self.source.header_crc() if whole else 0
        finite = True
        step = max(1, CHECK_BYTES // max(self.row_bytes, 1))
        for i in range(0, len(self), step):
            rows = self[i: i + step]
            if whole:
                crc = zlib.crc32(rows.reshape(-1).view(np.uint8), crc)
            if finite and rows.dtype.kind in "fc":
                finite = bool(np.isfinite(rows).all())
            if not finite and not whole:
                return False
        if whole and crc != self.source.info.CRC:
            raise InputError(f"{self.source.path}: damaged (member '{self.source.info.filename}' fails its CRC check)")
        return finite

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self._read(self.start, self.stop)
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def _read(self, first: int, end: int) -> np.ndarray:
        out = np.empty((end - first, *self.full_shape[1:]), self.dtype)
        raw = memoryview(out.reshape(-1).view(np.uint8))  # not memoryview(out): no buffer format for datetime64
        if out.nbytes and self.source.read_into(first * self.row_bytes, raw) != out.nbytes:
            raise InputError(f"{self.source.path}: truncated (rows {first}..{end - 1} are not in the file)")
        return out


def _window(arr, start: int, stop: int):
    return arr.window(start, stop) if isinstance(arr, StoredRows) else arr[start:stop]


class FeedSet:
    """A re-iterable, sample-major set of feeds: ``{input name: array (N, *sample shape)}``.

    Arrays are numpy arrays or :class:`StoredRows` (read from disk as the samples are used).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray | StoredRows], origin: str) -> None:
        self.arrays = {name: arr if isinstance(arr, StoredRows) else np.asarray(arr) for name, arr in arrays.items()}
        self.origin = origin
        counts = {name: arr.shape[0] if arr.ndim else 0 for name, arr in self.arrays.items()}
        if len(set(counts.values())) > 1:
            raise InputError(f"{origin}: arrays hold different sample counts {counts}")
        self.count = next(iter(counts.values()), 0)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Feed]:
        for i in range(self.count):  # 0-d samples as 0-d arrays, not numpy scalars (onnxruntime refuses np.bool_)
            yield {name: np.asarray(arr[i]) for name, arr in self.arrays.items()}

    def window(self, start: int, stop: int) -> FeedSet:
        """Samples ``start`` to ``stop - 1`` (nothing read from disk)."""
        return FeedSet({name: _window(arr, start, stop) for name, arr in self.arrays.items()},
                       f"{self.origin}[{start}:{stop}]")

    def head(self, n: int) -> FeedSet:
        return self.window(0, n)

    def batches(self, size: int) -> Iterator[Feed]:
        """Consecutive samples joined along the model's batch axis (axis 0 of each sample)."""
        for start in range(0, self.count, size):
            yield {
                name: arr[start : start + size].reshape(-1, *arr.shape[2:])
                for name, arr in self.arrays.items()
            }

    def check(self, model: onnx.ModelProto) -> None:
        """Every required input present with the right dtype, rank and fixed dims; values finite."""
        if self.count == 0:
            raise InputError(f"{self.origin}: no samples")
        for value in model_inputs(model):
            if value.name not in self.arrays:
                raise InputError(
                    f"{self.origin}: no array for model input '{value.name}' "
                    f"(has: {', '.join(sorted(self.arrays)) or 'nothing'})"
                )
            arr = self.arrays[value.name]
            want = input_dtype(value)
            if arr.dtype != want:
                raise InputError(f"{self.origin}: input '{value.name}' is {arr.dtype}, the model wants {want}")
            if not _finite(arr):
                raise InputError(f"{self.origin}: input '{value.name}' holds NaN or Inf")
            dims = input_dims(value)
            if dims is None:
                continue
            sample_shape = arr.shape[1:]
            if len(sample_shape) != len(dims):
                raise InputError(
                    f"{self.origin}: input '{value.name}' samples have rank {len(sample_shape)} "
                    f"{tuple(sample_shape)}, the model wants rank {len(dims)} {tuple(dims)} "
                    "(arrays are sample-major: (N, *input_shape))"
                )
            for axis, (have, fixed) in enumerate(zip(sample_shape, dims)):
                if isinstance(fixed, int) and fixed > 0 and have != fixed:
                    raise InputError(
                        f"{self.origin}: input '{value.name}' axis {axis} is {have}, the model wants {fixed}"
                    )



def _finite(arr: np.ndarray | StoredRows) -> bool:
    """No NaN or Inf (stored rows: read once in chunks of about CHECK_BYTES, the member's CRC checked on the way)."""
    if isinstance(arr, StoredRows):
        return arr.scan()
    return arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all())


def load_feeds(path: str | Path) -> FeedSet:
    """Read an ``.npz`` file or a folder of ONNX ``test_data_set_*/input_*.pb``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file not found: {path}")
    if path.is_dir():
        return _load_test_data_folder(path)
    try:
        arrays = _read_npz(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if not arrays:
        raise InputError(f"{path}: the .npz file holds no arrays")
    return FeedSet(arrays, str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray | StoredRows]:
    """An .npz's arrays: :class:`StoredRows` where a member can be read by rows, the others loaded."""
    arrays: dict[str, np.ndarray | StoredRows] = {}
    with np.load(path, allow_pickle=False) as npz, zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise InputError(f"{path}: member '{info.filename}' is not a .npy array (an .npz of feeds holds "
                                 "one array per model input, as np.savez writes it)")
            name = info.filename.removesuffix(".npy")
            found = _row_source(path, archive, f, info)
            if found is None:
                arrays[name] = npz[name]
                continue
            arrays[name] = StoredRows(*found)
    return arrays


def _row_source(path: Path, archive: zipfile.ZipFile, f, info: zipfile.ZipInfo):
    """(bytes source, dtype, shape) of a member to read by rows; None: load it whole."""
    if info.compress_type == zipfile.ZIP_STORED:
        f.seek(info.header_offset)
        local = f.read(30)  # the local header: its name and extra lengths may differ from the directory's
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise InputError(f"{path}: damaged (no local header for '{info.filename}')")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        header = _array_header(f)
        header_bytes = f.tell() - start
        source = _FileBytes(path, f.tell(), info, start)
    elif info.file_size <= INFLATE_WHOLE_BYTES:
        return None
    else:
        with archive.open(info) as member:
            header = _array_header(member)
            header_bytes = member.tell()
        source = _DeflatedBytes(path, info.filename, header_bytes)
    if header is None:
        return None
    dtype, shape = header
    # rows are read by offset, so a header that claims more than the member holds would read what follows it
    if header_bytes + dtype.itemsize * math.prod(shape) > info.file_size:
        raise InputError(f"{path}: damaged (member '{info.filename}' is shorter than its {shape} array)")
    return source, dtype, shape


def _array_header(f) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of the .npy data that follows in ``f`` when it can be read by rows, else None."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        return None
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject or not shape or (fortran_order and len(shape) > 1):
        return None
    return dtype, shape


def _load_test_data_folder(folder: Path) -> FeedSet:
    sets = sorted(folder.glob("test_data_set_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not sets:
        raise InputError(f"{folder}: no test_data_set_* folders")
    samples: dict[str, list[np.ndarray]] = {}
    for data_set in sets:
        files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        for position, file in enumerate(files):
            tensor = onnx.TensorProto()
            try:  # a sequence or optional parses as a TensorProto too: only to_array tells
                tensor.ParseFromString(file.read_bytes())
                array = numpy_helper.to_array(tensor)
            except Exception:
                raise InputError(f"{file}: not a serialized TensorProto (sequence, map and optional feeds are "
                                 "not supported)") from None
            samples.setdefault(tensor.name or f"#{position}", []).append(array)
    return FeedSet({name: np.stack(arrs) for name, arrs in samples.items()}, str(folder))


def name_positional_inputs(feeds: FeedSet, model: onnx.ModelProto) -> FeedSet:
    """Test-data tensors without names are fed by position."""
    inputs = model_inputs(model)
    renamed = {}
    for name, arr in feeds.arrays.items():
        if name.startswith("#") and int(name[1:]) < len(inputs):
            name = inputs[int(name[1:])].name
        renamed[name] = arr
    return FeedSet(renamed, feeds.origin)


def random_feeds(
    model: onnx.ModelProto,
    count: int = 4,
    seed: int = 0,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    integer_bounds: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[FeedSet, list[str]]:
    """Seeded random samples of the right dtype and shape, and notes on every assumed dimension.

    Symbolic dims are 1 unless ``input_shapes`` says otherwise; a fixed 0 stays 0 (a zero-size
    input). Integer inputs take values in ``integer_bounds[name]`` (low, high exclusive), else 0 or 1:
    valid for the commonest integer inputs, attention masks (a 6 in a BERT mask overflows to NaN) and flags.
    """
    check_input_shapes(model, input_shapes)
    rng = np.random.default_rng(seed)
    input_shapes = dict(input_shapes or {})
    integer_bounds = dict(integer_bounds or {})
    arrays: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for value in model_inputs(model):
        if value.name in input_shapes:
            shape = tuple(input_shapes[value.name])
        else:
            dims = input_dims(value) or []
            shape = tuple(d if isinstance(d, int) and d >= 0 else 1 for d in dims)
            assumed = [str(d) for d in dims if not (isinstance(d, int) and d >= 0)]
            if assumed:
                notes.append(f"input '{value.name}': symbolic dims {', '.join(assumed)} taken as 1")
        dtype = input_dtype(value)
        if dtype.kind == "f":
            arr = rng.standard_normal((count, *shape)).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, (count, *shape)).astype(dtype)
        elif dtype.kind in "iu":
            low, high = integer_bounds.get(value.name, (0, 2))
            arr = rng.integers(low, high, (count, *shape)).astype(dtype)
            if value.name in integer_bounds:
                notes.append(f"input '{value.name}': integers in [{low}, {high}) as the graph reads it")
        else:
            raise InputError(f"input '{value.name}' has dtype {dtype}: pass --data for it")
        arrays[value.name] = arr
    notes.insert(0, f"random feeds: {count} samples, seed {seed}")
    return FeedSet(arrays, "random"), notes


def check_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Every --input-shape names an input the caller feeds, with its rank and its fixed dims."""
    inputs = {v.name: v for v in model_inputs(model)}
    for name, shape in (input_shapes or {}).items():
        if name not in inputs:
            raise InputError(f"--input-shape {name}=...: the model has no input '{name}' "
                             f"(its inputs: {', '.join(inputs) or 'none'})")
        dims = input_dims(inputs[name])
        if any(d < 0 for d in shape):
            raise InputError(f"--input-shape {name}: dims must be >= 0, not {tuple(shape)}")
        if dims is None:
            continue
        if len(shape) != len(dims):
            raise InputError(f"--input-shape {name}: {len(shape)} dims given, the model's input has rank "
                             f"{len(dims)} {tuple(d if d is not None else '?' for d in dims)}")
        for axis, (given, fixed) in enumerate(zip(shape, dims)):
            if isinstance(fixed, int) and fixed >= 0 and given != fixed:
                raise InputError(f"--input-shape {name}: axis {axis} is fixed at {fixed} in the model, not {given}")


def as_feeds(source: object, model: onnx.ModelProto) -> FeedSet:
    """Accept a path, a FeedSet, a mapping of sample-major arrays, or an iterable of feed dicts."""
    if isinstance(source, FeedSet):
        feeds = source
    elif isinstance(source, (str, Path)):
        feeds = name_positional_inputs(load_feeds(source), model)
    elif isinstance(source, Mapping):
        feeds = FeedSet(source, "data")
    elif isinstance(source, Iterable) or callable(source):
        samples = list(source() if callable(source) else source)
        if not samples:
            raise InputError("data: no samples")
        names = samples[0].keys()
        feeds = FeedSet({n: np.stack([np.asarray(s[n]) for s in samples]) for n in names}, "data")
    else:
        raise InputError(f"data: cannot use a {type(source).__name__} as feeds")
    feeds.check(model)
    return feeds


def load_labels(source: object, count: int) -> np.ndarray:
    """Class labels for the validation samples: an .npz (key ``labels`` or its only array) or an array."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"labels file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                key = "labels" if "labels" in npz.files else (npz.files[0] if len(npz.files) == 1 else None)
                if key is None:
                    raise InputError(f"{path}: expected an array named 'labels' (has {', '.join(npz.files)})")
                labels = npz[key]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None
    else:
        labels = np.asarray(source)
    if labels.dtype.kind not in "iu" or labels.ndim == 0 or labels.shape[0] != count:
        raise InputError(f"labels: expected {count} integer class labels (one per validation sample), "
                         f"got {labels.dtype} {labels.shape}")
    return labels


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` strings to a mapping (the CLI's --input-shape)."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InputError(f"--input-shape '{spec}': expected NAME=D1,D2,... with whole numbers") from None
    return shapes

