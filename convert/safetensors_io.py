"""Safetensors files, read lazily (memory-mapped, zero-copy views) and written atomically.

Format: 8-byte little-endian header length N, N bytes of JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw little-endian tensor bytes.
Reading validates the header against the file size, so a truncated or corrupt shard is reported by name.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
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
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
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


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (in the given order) to `path` atomically (temp file + fsync + rename)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {}
    offset = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in DTYPE_NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
        nbytes = int(arr.size) * dt.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
