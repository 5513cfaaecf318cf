"""Safetensors files, read lazily (memory-mapped, zero-copy views) and written atomically.

Format: 8-byte little-endian header length N, N bytes of JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw little-endian tensor bytes.
Reading validates the header against the file size, so a truncated or corrupt shard is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One safetensors file: `.infos` (validated header), `.get(name)` a read-only memory-mapped array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path}: truncated (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(f"{self.path}: truncated or corrupt header (header length {n}, "
                                           f"file size {size})")
                header_bytes = f.read(n)
                header = json.loads(header_bytes)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise SafetensorsError(f"{self.path}: is a directory, not a safetensors file") from None
        except OSError as e:
            raise SafetensorsError(f"{self.path}: unreadable ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        self.size = size
        self.header_sha256 = hashlib.sha256(raw + header_bytes).hexdigest()
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if e - b != expected or b < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has {e - b} bytes, shape {list(shape)} "
                                       f"{dtype} needs {expected}")
            if base + e > size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {base + e} but the "
                                       f"file has {size} bytes")
            self.infos[name] = TensorInfo(name, dtype, shape, base + b, base + e)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of the tensor (pages are read only when touched)."""
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if self._mmap is None:
            if self.path.stat().st_size == 0:
                raise SafetensorsError(f"{self.path}: empty file")
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        flat = self._mmap[info.begin:info.end].view(DTYPES[info.dtype])
        return flat.reshape(info.shape)

    def map_tensor(self, name: str) -> np.ndarray:
        """A fresh read-only memory map of just this tensor, unmapped once the array (and its views) is dropped.

        Streaming readers use one map per block, so the pages a block touched stop counting toward the
        process's resident memory as soon as the block has been copied out (a shared map of the whole file would
        keep every page it ever touched resident).
        """
        info = self.infos.get(name)
        if info is None:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if info.nbytes == 0:
            return np.zeros(info.shape, DTYPES[info.dtype])
        return np.memmap(self.path, dtype=DTYPES[info.dtype], mode="r", offset=info.begin, shape=info.shape)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None, *, durable: bool = True) -> None:
    """Write tensors (in the given order) to `path` atomically (temp file + fsync + rename).

    durable=False skips the fsync (test fixtures, scratch files); the rename still makes the write atomic.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    entries = [(name, np.dtype(arr.dtype), tuple(arr.shape)) for name, arr in items]
    with SafetensorsWriter(path, entries, metadata, durable=durable) as writer:
        for name, arr in items:
            writer.write(name, arr)


class SafetensorsWriter:
    """Streams tensors into one safetensors file: the header (all names, dtypes, shapes) first, then each
    tensor's bytes in the declared order, written in row blocks so a strided view is never copied whole.

    The file appears at `path` only on a successful `close()` (temp file + optional fsync + rename); leaving the
    `with` block on an exception removes the temp file.
    """

    BLOCK_BYTES = 64 * 1024 * 1024

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, np.dtype | str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, *, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        header: dict = {}
        self._pending: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, dtype, shape in entries:
            dt = DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else np.dtype(dtype)
            if dt not in DTYPE_NAMES:
                raise SafetensorsError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
            shape = tuple(int(s) for s in shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, dt, shape))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.nbytes = 8 + len(blob) + offset
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next declared tensor (any strides; cast to the declared dtype block by block)."""
        from m1jax.convert.array_copy import contiguous_copy

        if self._next >= len(self._pending):
            raise SafetensorsError(f"{self.path}: tensor {name!r} was not declared in the header")
        want, dt, shape = self._pending[self._next]
        if name != want:
            raise SafetensorsError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if tuple(array.shape) != shape:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has shape {list(array.shape)}, the header "
                                   f"declares {list(shape)}")
        self._next += 1
        if array.ndim == 0 or array.size == 0:
            self._file.write(np.asarray(array, dt).reshape(-1).view(np.uint8))
            return
        row_bytes = max(1, array[0].size * max(dt.itemsize, array.dtype.itemsize))
        step = max(1, self.BLOCK_BYTES // row_bytes)
        for r in range(0, array.shape[0], step):
            block = contiguous_copy(array[r:r + step], dt)
            self._file.write(block.reshape(-1).view(np.uint8))

    def close(self) -> None:
        if self._next != len(self._pending):
            missing = [n for n, _, _ in self._pending[self._next:]]
            self.abort()
            raise SafetensorsError(f"{self.path}: {len(missing)} declared tensor(s) never written, first "
                                   f"{missing[0]!r}")
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
