"""The journal of a conversion in progress: what is being converted, and which blocks are safely on disk.

File format (JSON lines): the first line is the header `{"journal": ..., "arguments": {...}, "source": {...}}`
(written atomically before any array data); every further line is `{"done": [block ids]}`, appended after the
OCDBT commit that made those blocks durable, then flushed and fsync'd. A record therefore never names a block
that is not on disk; a torn last line (killed mid-append) is ignored and its blocks are simply written again.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from m1jax.convert.errors import ConvertError
from m1jax.convert.orbax_store import fsync_dir

KIND = "m1jax-convert-journal"
VERSION = 1


def describe_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two journal headers (arguments and source fingerprint)."""
    out = []
    for key in sorted(set(old.get("arguments", {})) | set(new.get("arguments", {}))):
        a, b = old.get("arguments", {}).get(key), new.get("arguments", {}).get(key)
        if a != b:
            out.append(f"argument {key}: {a!r} before, {b!r} now")
    src_old, src_new = old.get("source", {}), new.get("source", {})
    for name in ("config.json", "model.safetensors.index.json"):
        if src_old.get(name) != src_new.get(name):
            out.append(f"source {name} changed")
    shards_old, shards_new = src_old.get("shards", {}), src_new.get("shards", {})
    for name in sorted(set(shards_old) | set(shards_new)):
        a, b = shards_old.get(name), shards_new.get(name)
        if a is None:
            out.append(f"source shard {name} is new")
        elif b is None:
            out.append(f"source shard {name} is gone")
        elif a != b:
            what = ", ".join(f"{k} {a.get(k)} → {b.get(k)}" for k in ("size", "mtime_ns", "header_sha256")
                             if a.get(k) != b.get(k))
            out.append(f"source shard {name} changed ({what})")
    return out


class Journal:
    """An open journal; `record(ids)` appends a durable record of finished blocks."""

    def __init__(self, path: Path, header: dict, done: set[str]):
        self.path = path
        self.header = header
        self.done = done
        self._file = open(path, "a")
        try:  # one writer at a time; the lock dies with its process (kill -9 included)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConvertError(f"another m1jax convert is writing to {path.parent} right now") from None

    @classmethod
    def start(cls, path: Path, arguments: dict, source: dict) -> Journal:
        header = {"journal": KIND, "version": VERSION, "arguments": arguments, "source": source}
        tmp = path.with_name(path.name + ".new")
        with open(tmp, "w") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return cls(path, header, set())

    @staticmethod
    def read(path: Path) -> tuple[dict, set[str]]:
        """(header, finished block ids) of an existing journal."""
        text = path.read_text()
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is empty or a torn record
        try:
            header = json.loads(complete[0])
            if header.get("journal") != KIND:
                raise ValueError
        except (IndexError, ValueError):
            raise ConvertError(f"{path}: not a readable m1jax conversion journal") from None
        done: set[str] = set()
        for line in complete[1:]:
            try:
                done.update(json.loads(line)["done"])
            except (ValueError, KeyError, TypeError):
                continue
        return header, done

    @classmethod
    def resume(cls, path: Path, arguments: dict, source: dict, *, what: str) -> Journal:
        """Reopen a journal whose header matches; otherwise raise `ConvertError` listing what differs."""
        header, done = cls.read(path)
        wanted = {"journal": KIND, "version": VERSION, "arguments": arguments, "source": source}
        if header.get("version") != VERSION:
            raise ConvertError(f"{what} was started by a different m1jax version (journal version "
                               f"{header.get('version')}, this is {VERSION}); delete it and convert again")
        diffs = describe_differences(header, wanted)
        if diffs:
            raise ConvertError(f"{what} holds an interrupted conversion with different inputs, refusing to resume "
                               f"({'; '.join(diffs[:10])}{'; ...' if len(diffs) > 10 else ''}); rerun with the "
                               f"original arguments and source, or delete it")
        return cls(path, header, done)

    def record(self, ids: list[str]) -> None:
        self._file.write(json.dumps({"done": ids}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(ids)

    def close(self) -> None:
        self._file.close()

