"""Reading big safetensors files one tensor at a time, single or sharded (the format and its
checks: safetensors.py beside this file).

A checkpoint of a billion parameters should never be in memory twice (file and model). So
only the header is read up front -- and checked in full, exactly as load_file checks it --
and the data section is opened as a memory map: the operating system reads a tensor's pages
when they are touched. Each tensor is copied out (in the dtype asked for) and its pages are
handed back at once (madvise DONTNEED), so the process holds the model plus one tensor, not
the file. A sharded checkpoint is a folder of such files with an index,
model.safetensors.index.json: {"metadata": {...}, "weight_map": {"<name>": "<file>"}}.
"""
import json
import mmap
import struct
from pathlib import Path

import torch

from .safetensors import (DTYPES, MAX_HEADER_BYTES, SafetensorsError, _check_little_endian,
                          _parse_header, atomic_write_files, check_header, serialize)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHUNK_BYTES = 1 << 20  # a big tensor is copied out of the map this many bytes at a time


def read_header(path):
    """path -> (entries {name: {"dtype", "shape", "data_offsets"}}, metadata, data_start),
    every entry checked against the file's size; no tensor data is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
        head = f.read(n) if len(first) == 8 and n <= min(MAX_HEADER_BYTES, size) else b""
    if len(first) == 8 and 8 + n > size:
        raise SafetensorsError(f"{path}: header length {n} runs past the end of the "
                               f"{size}-byte file (truncated or not a safetensors file)")
    header, metadata, _ = _parse_header(first + head, str(path))
    check_header(header, size - 8 - n, str(path))
    return header, metadata, 8 + n


class MappedFile:
    """One safetensors file: its checked header, and its tensors read one at a time."""

    def __init__(self, path):
        _check_little_endian("read")
        self.path = Path(path)
        self.entries, self.metadata, self.data_start = read_header(self.path)
        self._file = open(self.path, "rb")
        # a private copy-on-write map: writable as torch.frombuffer wants, never written
        empty = self.path.stat().st_size == 0
        self._map = None if empty else mmap.mmap(self._file.fileno(), 0,
                                                 access=mmap.ACCESS_COPY)

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def tensor(self, name, dtype=None):
        """A copy of tensor `name` (in `dtype` if given) owning its memory. It is copied in
        chunks of CHUNK_BYTES, each chunk's pages released from this process once copied, so
        that reading a big tensor holds its copy and one chunk of the file, not the file's
        pages of the whole tensor beside its copy."""
        entry = self.entries[name]
        stored = DTYPES[entry["dtype"]]
        begin, end = (self.data_start + o for o in entry["data_offsets"])
        if stored == torch.bool:
            return self._bool_tensor(name, entry, begin, end).to(dtype or stored)
        out = torch.empty(entry["shape"], dtype=dtype or stored)
        flat, size = out.view(-1), stored.itemsize
        step = max(1, CHUNK_BYTES // size)
        for first in range(0, flat.numel(), step):
            n = min(step, flat.numel() - first)
            start = begin + first * size  # any offset will do, odd ones included
            flat[first:first + n] = torch.frombuffer(self._map, dtype=stored, count=n,
                                                     offset=start)
            self._release(start, start + n * size)
        return out

    def _bool_tensor(self, name, entry, begin, end):
        if begin == end:
            return torch.empty(entry["shape"], dtype=torch.bool)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=begin)
        if bool((raw > 1).any()):
            raise SafetensorsError(f"{self.path}: BOOL tensor {name!r} holds bytes other than "
                                   "0 and 1")
        return raw.to(torch.bool).reshape(entry["shape"])

    def _release(self, begin, end):
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            start = begin - begin % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self):
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Checkpoint:
    """The weights of a folder: model.safetensors, or shards listed by the index. Every
    file's header is read and checked when opened; tensors are read one at a time."""

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / INDEX_NAME).is_file():
            files = shard_files(folder)
        elif (folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise FileNotFoundError(f"{folder}: no {SINGLE_NAME} and no {INDEX_NAME}")
        self.files, self.where = [], {}
        try:
            for name in files:
                self.files.append(MappedFile(folder / name))
                for key in self.files[-1].entries:
                    if key in self.where:
                        raise SafetensorsError(f"{folder}: tensor {key!r} is in both "
                                               f"{self.where[key].path.name} and {name}")
                    self.where[key] = self.files[-1]
            if (folder / INDEX_NAME).is_file():
                check_index(folder, {k: f.path.name for k, f in self.where.items()})
        except BaseException:
            self.close()
            raise

    def shapes(self):
        """{name: shape} of every tensor in the checkpoint."""
        return {k: f.shape(k) for k, f in self.where.items()}

    def tensor(self, name, dtype=None):
        return self.where[name].tensor(name, dtype)

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_index(folder):
    path = Path(folder) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(v, str) for v in weight_map.values())):
        raise SafetensorsError(f"{path}: needs a non-empty \"weight_map\" object of "
                               "tensor name -> file name")
    return weight_map


def shard_files(folder):
    """The shard names the index lists, in order; each a plain file name in the folder."""
    names = sorted(set(read_index(folder).values()))
    for name in names:
        if Path(name).name != name or not (Path(folder) / name).is_file():
            raise SafetensorsError(f"{Path(folder) / INDEX_NAME}: shard {name!r} is not a "
                                   "file in this folder")
    return names


def check_index(folder, found):
    """The index must name every tensor the shards hold, each in the shard that holds it."""
    weight_map = read_index(folder)
    wrong = sorted(k for k in set(weight_map) | set(found) if weight_map.get(k) != found.get(k))
    if wrong:
        raise SafetensorsError(f"{Path(folder) / INDEX_NAME}: the index and the shards "
                               f"disagree about {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")


def save_checkpoint_files(tensors: dict, folder, max_shard_bytes=None, extra_files=None):
    """Write {name: Tensor} to `folder` as model.safetensors, or -- when it passes
    max_shard_bytes -- as shards model-0000i-of-0000n.safetensors with the index, all files
    atomically together. Tensors go into shards in name order, a new shard when the next one
    would pass the limit (a tensor bigger than the limit gets a shard of its own).
    extra_files: {name: bytes} written in the same atomic step (config.json)."""
    shards, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    folder = Path(folder)
    files = {folder / name: data for name, data in (extra_files or {}).items()}
    if len(shards) == 1:
        atomic_write_files({**files, folder / SINGLE_NAME: serialize(tensors, meta)})
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        files[folder / file] = serialize({k: tensors[k] for k in names}, meta)
        weight_map.update({k: file for k in names})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                            for t in tensors.values())},
             "weight_map": weight_map}
    files[folder / INDEX_NAME] = json.dumps(index, indent=2).encode("utf-8")
    atomic_write_files(files)
