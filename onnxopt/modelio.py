"""Loading and saving models: external data read lazily, written by streaming, files replaced atomically.

In memory, a tensor with external data keeps ``data_location=EXTERNAL`` and an *absolute*
``location``; its bytes are read only when a pass asks for them (:func:`graph.tensor_to_array`).
So a pass that never looks at weights (``dce``) costs no memory for them, and saving copies the
bytes from file to file in chunks. Files written to disk always carry relative locations.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError
from .graph import model_tensors
from .tensors import (ALIGNMENT, SPILL, copy_external_bytes, external_info, is_external, set_external_location,
                      spill_tensor, tensor_nbytes)

TWO_GB = 2**31
ATTRIBUTE_DATA = "attributes.data"  # a scratch copy's file for the external bytes of node attributes
EXTERNAL_THRESHOLD = 1024  # bytes: tensors at least this large go to the data file when saving externally
SPILL_WASTE = 0.25  # the spill file becomes the output's data file when at most this share of it is stale


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model_tensors(model))


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse a model; external data stays on disk, checked to exist and to stay inside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    model = onnx.ModelProto()
    try:
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
    except DecodeError:
        raise InputError(f"{path}: not an ONNX model, or the file is truncated (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or no opset import)")
    folder = path.resolve().parent
    external = False
    for tensor in model_tensors(model):
        if is_external(tensor):
            _resolve_external(tensor, folder, path)
            external = True
    try:
        # From the file when data is external: the checker then reads only the skeleton, not the weights.
        onnx.checker.check_model(str(path) if external else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{path}: the ONNX checker rejects the model: {first} "
                         "(a file cut short can parse and fail this way too: check that it is not truncated)") from None
    return model


def _resolve_external(tensor: onnx.TensorProto, folder: Path, model_path: Path) -> None:
    info = external_info(tensor)
    location = info.get("location", "")
    if not location or os.path.isabs(location) or Path(location).is_absolute():
        raise InputError(f"{model_path}: tensor '{tensor.name}' has external data at '{location}': "
                         "an absolute or empty path is refused (locations must stay inside the model's folder)")
    resolved = (folder / location).resolve()
    if folder not in resolved.parents:
        raise InputError(f"{model_path}: tensor '{tensor.name}' has external data at '{location}', "
                         "which escapes the model's folder: refused")
    if not resolved.is_file():
        raise InputError(f"{model_path}: external-data file '{location}' of tensor '{tensor.name}' is missing")
    end = int(info.get("offset", 0)) + int(info.get("length", tensor_nbytes(tensor)))
    if resolved.stat().st_size < end:
        raise InputError(f"{model_path}: external-data file '{location}' is truncated "
                         f"(tensor '{tensor.name}' needs {end} bytes, the file has {resolved.stat().st_size})")
    set_external_location(tensor, str(resolved))


def serialized_size_above(model: onnx.ModelProto, limit: int) -> bool:
    """Whether the serialized model passes ``limit`` bytes, measuring only when it may.

    Protobuf's ``ByteSize`` serializes the whole model (0.1-0.4 s for a 70 MB encoder), so the
    tensors' sizes from their dims come first: well below the limit, nothing else can make up the
    difference (graph structure is counted only near it).
    """
    tensors = sum(sum(map(len, t.string_data)) if t.data_type == onnx.TensorProto.STRING else tensor_nbytes(t)
                  for t in model_tensors(model) if not is_external(t))
    return tensors > limit or (tensors > limit // 2 and model.ByteSize() > limit)


def needs_file(model: onnx.ModelProto) -> bool:
    """onnxruntime and the checker need the model as files: it has external data or passes 2 GB inline."""
    return has_external_data(model) or serialized_size_above(model, TWO_GB - 2**24)


def check_output_path(path: Path, input_path: str | os.PathLike | None = None, overwrite_input: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or that would replace the input."""
    check_writable_target(path)
    if input_path is not None and not overwrite_input and path.resolve() == Path(input_path).resolve():
        raise InputError(f"output {path} is the input file: choose another path or pass --overwrite-input")


def check_writable_target(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external: bool | None = None,
    input_path: str | os.PathLike | None = None,
    overwrite_input: bool = False,
    move_spill: bool = False,
) -> Path:
    """Write ``model`` to ``path`` completely or not at all.

    ``external=None`` chooses external data when the model already has some or would pass 2 GB.
    The in-memory model stays valid whatever happens to the written files later, except with
    ``move_spill``: when the spill file holds most of the data (a pass rewrote the weights of a
    model with external data), it becomes the data file instead of being copied, and the in-memory
    model reads those tensors from the output's data file from then on.
    Writing over ``input_path`` is refused unless ``overwrite_input``.
    """
    path = Path(path)
    check_output_path(path, input_path, overwrite_input)
    if external is None:
        external = needs_file(model)
    if not external:
        with _atomic_file(path) as f:
            f.write(model.SerializeToString())
        return path
    _save_external(model, path, move_spill)
    return path


def _file_mode(path: Path) -> int:
    """The mode a written file gets: the mode of the file it replaces, else what the umask leaves of 0666
    (mkstemp's 0600 would make models and reports unreadable to everyone else)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def _atomic_file(path: Path):
    """A temporary file beside ``path`` that replaces it only when the block completes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _file_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Reports and other outputs: complete or absent, never half-written."""
    path = Path(path)
    check_writable_target(path)
    with _atomic_file(path) as f:
        f.write(data)


def _save_external(model: onnx.ModelProto, path: Path, move_spill: bool = False) -> None:
    """Stream every big tensor into ``<name>.data``, then write the skeleton that points at it.

    Inline tensors are first moved to the spill file, so the in-memory model never points at the
    file just written (which the caller may delete); afterwards every tensor points where it did,
    except those read from the very data file this save replaced, which take their new offsets.
    With ``move_spill``, when the spill file already holds most of the bytes (a pass rewrote the
    weights), the rest is appended to it and it becomes the data file instead (:func:`_publish_spill`).
    """
    data_name = f"{path.name}.data"
    data_path = (path.parent / data_name).resolve()
    if move_spill and _spill_holds_most(model, data_path):
        return _publish_spill(model, path, data_name, data_path)
    moved: list[tuple[onnx.TensorProto, dict[str, str], int, int]] = []
    with _atomic_file(data_path) as data:
        offset = 0
        for tensor in model_tensors(model):
            if not is_external(tensor):
                if len(tensor.raw_data) < EXTERNAL_THRESHOLD:
                    continue  # small tensors and typed fields (float_data, ...) stay inline
                spill_tensor(tensor)
            pad = -offset % ALIGNMENT
            data.write(b"\0" * pad)
            offset += pad
            length = _write_tensor_bytes(tensor, data)
            moved.append((tensor, external_info(tensor), offset, length))
            offset += length
        for tensor, _, start, length in moved:
            set_external_location(tensor, data_name, start, length)
        skeleton = model.SerializeToString()
    with _atomic_file(path) as f:
        f.write(skeleton)
    for tensor, before, start, length in moved:
        if Path(before["location"]) == data_path:
            set_external_location(tensor, str(data_path), start, length)
        else:
            set_external_location(tensor, before["location"], int(before.get("offset", 0)),
                                  int(before.get("length", length)))


def _write_tensor_bytes(tensor: onnx.TensorProto, out) -> int:
    if not is_external(tensor):
        out.write(tensor.raw_data)
        return len(tensor.raw_data)
    return copy_external_bytes(tensor, out)


def _data_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors a save with external data writes to the data file."""
    return [t for t in model_tensors(model) if is_external(t) or len(t.raw_data) >= EXTERNAL_THRESHOLD]


def _spill_holds_most(model: onnx.ModelProto, data_path: Path) -> bool:
    """Whether moving the spill file to ``data_path`` beats copying: it holds this model's tensors
    with little else (at most ``SPILL_WASTE`` stale once the rest is appended), on the same filesystem."""
    if SPILL.path is None or not SPILL.size():
        return False
    try:
        if os.stat(SPILL.path).st_dev != os.stat(data_path.parent).st_dev:
            return False
    except OSError:
        return False
    held = rest = 0
    for tensor in _data_tensors(model):
        length = int(external_info(tensor).get("length", tensor_nbytes(tensor))) if is_external(tensor) \
            else len(tensor.raw_data)
        if SPILL.holds(tensor):
            held += -(-length // ALIGNMENT) * ALIGNMENT  # with the padding that aligns the next tensor
        else:
            rest += length
    stale = SPILL.size() - held
    return held > rest and stale <= SPILL_WASTE * (SPILL.size() + rest)


def _publish_spill(model: onnx.ModelProto, path: Path, data_name: str, data_path: Path) -> None:
    """Append what the spill file lacks to it, move it to ``data_path``, then write the skeleton.

    The rewritten weights are written once. An error before the move leaves the output as it was
    (the tensors copied in read from the spill file then, as the rewritten ones do).
    """
    tensors = _data_tensors(model)
    for tensor in tensors:
        if not is_external(tensor):
            spill_tensor(tensor)
        elif not SPILL.holds(tensor):
            SPILL.copy_in(tensor)
    SPILL.publish(data_path, _file_mode(data_path))
    for tensor in tensors:
        set_external_location(tensor, data_name)
    skeleton = model.SerializeToString()
    for tensor in tensors:
        set_external_location(tensor, str(data_path))
    with _atomic_file(path) as f:
        f.write(skeleton)


def save_scratch(model: onnx.ModelProto, path: Path, *, placeholders: bool = False) -> None:
    """Write a throwaway copy for onnxruntime or the checker without copying any weight bytes.

    Only the graph is written; each external-data file is hard-linked beside it (copied where a
    link is impossible) and tensors keep their offsets. The checker reads no weights but refuses
    hard links, so for it ``placeholders`` writes sparse files of the same sizes instead. onnxruntime
    runs the checker on node attributes (Constant values, If / Loop bodies) too, so the bytes of
    those tensors (not whole files) are copied into a file of their own. A model too big to
    serialize inline first moves its big inline tensors to the spill file.
    """
    if model.ByteSize() >= TWO_GB - 2**24:
        for tensor in model_tensors(model):
            if not is_external(tensor) and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                spill_tensor(tensor)
    top_level = {id(t) for t in model.graph.initializer}
    links: dict[str, str] = {}
    moved: list[tuple[onnx.TensorProto, list[tuple[str, str]]]] = []
    attributes = None
    try:
        for tensor in model_tensors(model):
            if not is_external(tensor):
                continue
            moved.append((tensor, [(e.key, e.value) for e in tensor.external_data]))
            source = external_info(tensor)["location"]
            if id(tensor) not in top_level and not placeholders:
                if attributes is None:
                    attributes = open(path.parent / ATTRIBUTE_DATA, "wb")
                offset = attributes.seek(0, os.SEEK_END)
                length = copy_external_bytes(tensor, attributes)
                set_external_location(tensor, ATTRIBUTE_DATA, offset, length)
                continue
            if source not in links:
                links[source] = f"{len(links)}_{Path(source).name}"
                target = path.parent / links[source]
                if placeholders:
                    with open(target, "wb") as f:
                        f.truncate(Path(source).stat().st_size)
                else:
                    _link_or_copy(Path(source), target)
            set_external_location(tensor, links[source])
        if attributes is not None:
            attributes.close()  # complete before onnxruntime reads it
        path.write_bytes(model.SerializeToString())
    finally:
        if attributes is not None:
            attributes.close()
        for tensor, entries in moved:
            del tensor.external_data[:]
            for key, value in entries:
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy that shares nothing with ``model`` (external tensors still point to the same files)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
