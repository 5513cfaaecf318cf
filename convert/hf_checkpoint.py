"""An HF checkpoint directory: config, weight map over (possibly hundreds of) safetensors shards, validation.

The real MiniMax-M1 repo has 413 zero-based shards (`model-00000-of-00413.safetensors`) with tensors out of
layer order, so names are always resolved through `model.safetensors.index.json`'s `weight_map`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from m1jax.convert.hf_layout import ParamSpec, detect_layout, expected_tensors, is_ignored, param_specs
from m1jax.convert.safetensors_io import SafetensorsError, SafetensorsFile

from m1jax.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
# safetensors dtype → the m1jax dtype that holds it without loss (m1jax computes in at most float32)
SAFETENSORS_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
MAX_LISTED = 50  # problems listed in one error message (the count is always complete)
# Files of an HF model directory that travel with the weights through convert and export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
TOKENIZER_GLOBS = ("*.model",)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message lists every problem found (tensor and file named)."""


class HFCheckpoint:
    """Lazy access to the tensors of an HF checkpoint directory (nothing is read until a view is touched)."""

    def __init__(self, path: str | os.PathLike, **runtime):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.config = ModelConfig.from_json_file(self.path / "config.json", **runtime)
        problems: list[str] = []
        index_path = self.path / INDEX
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: not a valid safetensors index (needs a 'weight_map' object)"
                                      ) from None
        elif (self.path / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: no {INDEX} and no {SINGLE}")
        self.files: dict[str, SafetensorsFile] = {}
        shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        for shard in shard_names:
            try:
                self.files[shard] = SafetensorsFile(self.path / shard)
            except SafetensorsError as e:
                problems.append(str(e))
        self.weight_map: dict[str, str] = {}
        self.unreadable: set[str] = set()  # tensors whose shard could not be opened (reported once, per shard)
        if weight_map is None:
            if SINGLE in self.files:
                self.weight_map = {n: SINGLE for n in self.files[SINGLE].keys()}
        else:
            for name, shard in weight_map.items():
                if shard not in self.files:
                    self.unreadable.add(name)
                elif name not in self.files[shard].infos:
                    problems.append(f"tensor {name!r}: the index points to {shard}, which does not contain it")
                else:
                    self.weight_map[name] = shard
        self.load_problems = problems

    def info(self, name: str):
        return self.files[self.weight_map[name]].infos[name]

    def get(self, name: str) -> np.ndarray:
        return self.files[self.weight_map[name]].get(name)

    @property
    def layout(self) -> str:
        return detect_layout(list(self.weight_map))

    def validate(self) -> list[ParamSpec]:
        """Check every tensor against the config at once; raise `CheckpointError` listing all problems."""
        problems = list(self.load_problems)
        expected = expected_tensors(self.config, self.layout)
        present = {n for n in self.weight_map if not is_ignored(n)}
        missing = sorted(set(expected) - present - self.unreadable)
        for name in missing:
            problems.append(f"missing tensor {name!r} (expected shape {list(expected[name])})")
        for name in sorted(present - set(expected)):
            problems.append(f"unexpected tensor {name!r} in {self.weight_map[name]}")
        for name in sorted(present & set(expected)):
            info = self.info(name)
            if info.shape != expected[name]:
                problems.append(f"tensor {name!r} in {self.weight_map[name]} has shape {list(info.shape)}, "
                                f"config implies {list(expected[name])}")
            if info.dtype not in FLOAT_DTYPES:
                problems.append(f"tensor {name!r} in {self.weight_map[name]} has dtype {info.dtype}, expected "
                                f"a float dtype {FLOAT_DTYPES}")
        if problems:
            shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                             if len(problems) > MAX_LISTED else [])
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({len(problems)} problem"
                                  f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(shown))
        return param_specs(self.config, self.layout)

    def map_tensor(self, name: str) -> np.ndarray:
        """A fresh memory map of one tensor (see `SafetensorsFile.map_tensor`)."""
        return self.files[self.weight_map[name]].map_tensor(name)

    def fingerprint(self) -> dict:
        """What identifies this source for a resumed conversion: config and index bytes, and per shard its
        size, mtime and header hash (a re-downloaded or edited shard changes at least one of them)."""
        def sha(path: Path) -> str | None:
            return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None

        return {
            "config.json": sha(self.path / "config.json"),
            INDEX: sha(self.path / INDEX),
            "shards": {name: {"size": f.size, "mtime_ns": f.path.stat().st_mtime_ns, "header_sha256": f.header_sha256}
                       for name, f in sorted(self.files.items())},
        }

    def main_dtype(self) -> str:
        """The most common float dtype among the tensors by bytes ("bfloat16" for the real M1 repo)."""
        totals: dict[str, int] = {}
        for name in self.weight_map:
            info = self.info(name)
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        top = max(totals, key=totals.get) if totals else "F32"
        return SAFETENSORS_DTYPE_NAMES[top]


def tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The tokenizer / generation files present in `directory` (see `TOKENIZER_FILES`)."""
    directory = Path(directory)
    found = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        found += sorted(p for p in directory.glob(pattern) if p.is_file())
    return found


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation files of `src` into `dst` (each atomically); return their names."""
    names = []
    for path in tokenizer_files(src):
        tmp = Path(dst) / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, Path(dst) / path.name)
        names.append(path.name)
    return names
