"""A small, strict reader and writer for the safetensors format, written here from its spec.

Layout of a file:

    [8 bytes]  N, the header length, unsigned 64-bit little-endian
    [N bytes]  JSON: {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                      ..., "__metadata__": {"<str>": "<str>"}}   (may be padded with spaces)
    [rest]     the raw little-endian bytes of every tensor; offsets are relative to this part

Nothing in the file is ever executed: the header is parsed as JSON and the tensors are copied out
of raw bytes, which is why adapters and checkpoints use this format instead of pickle. Every
field is validated before any tensor is built, so a truncated, corrupted or hostile file fails
with a message that says what is wrong.
"""
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's own limit


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file; the message says why."""


def _check_little_endian(action: str) -> None:
    """The format stores little-endian bytes, which are copied as they are: a big-endian host
    would read (or write) every number byte-swapped."""
    if sys.byteorder != "little":
        raise RuntimeError(f"cannot {action} safetensors on a big-endian machine: this code "
                           "copies little-endian bytes as they are")


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the
    target: a crash leaves either the old file or the new one, never half of one."""
    atomic_write_files({path: data})


def atomic_write_files(files: dict) -> None:
    """{path: bytes}: every file is written in full to a temporary name first, and only then
    are they all renamed into place -- so a failure while writing (a full disk, a folder that
    cannot be written) leaves every old file as it was, and never a new one beside an old one."""
    temps = {}
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path) -> None:
    """Fail now, with the path in the message, if `path` could not be written atomically later
    (its folder cannot be made, or holds no new file, or the path is a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def serialize(tensors: dict, metadata: dict = None) -> bytes:
    """tensors: {name: Tensor} -> the bytes of a safetensors file."""
    _check_little_endian("write")
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        blob = _tensor_bytes(t)
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def save_file(tensors: dict, path, metadata: dict = None) -> None:
    atomic_write_bytes(path, serialize(tensors, metadata))


def _parse_header(raw: bytes, where: str):
    if len(raw) < 8:
        raise SafetensorsError(f"{where}: file is {len(raw)} bytes, too short for the 8-byte "
                               "header length (truncated?)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(raw):
        raise SafetensorsError(f"{where}: header length {n} runs past the end of the "
                               f"{len(raw)}-byte file (truncated or not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as e:
        raise SafetensorsError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: __metadata__ must be an object mapping strings to "
                               f"strings, got {metadata!r:.80}")
    return header, metadata, raw[8 + n:]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """json's object hook: a key given twice is an error (json.loads would keep the last)."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise _DuplicateKey(f"key(s) {repeated} appear more than once in one object")
    return dict(pairs)


def _check_entry(name, entry, data_len, where):
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{where}: entry {name!r} must have exactly dtype, shape and "
                               "data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}; "
                               f"known: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"{where}: tensor {name!r} of shape {shape} and dtype {dtype} "
                               f"needs {nbytes} bytes but its offsets span "
                               f"{offsets[1] - offsets[0]}")
    if offsets[1] > data_len:
        raise SafetensorsError(f"{where}: tensor {name!r} ends at byte {offsets[1]} but the data "
                               f"section has only {data_len} bytes (truncated?)")


def _check_layout(header, data_len, where):
    """Tensors must tile the data section exactly: no overlap, no gap, nothing left over."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap"
            raise SafetensorsError(f"{where}: tensor {name!r} {kind} (starts at {begin}, "
                                   f"expected {cursor})")
        cursor = end
    if cursor != data_len:
        raise SafetensorsError(f"{where}: data section has {data_len} bytes but the tensors "
                               f"cover {cursor}")


def check_header(header, data_len, where):
    """Every entry well formed and inside the data section, and together tiling it exactly."""
    for name, entry in header.items():
        _check_entry(name, entry, data_len, where)
    _check_layout(header, data_len, where)


def deserialize(raw: bytes, where: str = "<bytes>"):
    """bytes -> ({name: Tensor}, metadata). Validates everything before building tensors."""
    _check_little_endian("read")
    header, metadata, data = _parse_header(raw, where)
    check_header(header, len(data), where)
    tensors = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        buf = bytearray(data[begin:end])
        storage = torch.uint8 if dtype == torch.bool else dtype
        t = torch.frombuffer(buf, dtype=storage) if buf else torch.empty(0, dtype=storage)
        if dtype == torch.bool and bool((t > 1).any()):
            raise SafetensorsError(f"{where}: BOOL tensor {name!r} holds bytes other than 0 "
                                   "and 1")
        tensors[name] = t.to(dtype).reshape(e["shape"])
    return tensors, metadata


def load_file(path):
    """Read a safetensors file -> ({name: Tensor}, metadata dict of strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return deserialize(path.read_bytes(), where=str(path))
