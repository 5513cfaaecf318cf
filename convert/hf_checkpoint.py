"""An HF checkpoint directory: config, weight map over (possibly hundreds of) safetensors shards, validation.

The real MiniMax-M1 repo has 413 zero-based shards (`model-00000-of-00413.safetensors`) with tensors out of
layer order, so names are always resolved through `model.safetensors.index.json`'s `weight_map`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from convert.hf_layout import ParamSpec, detect_layout, expected_tensors, is_ignored, param_specs
from convert.safetensors_io import SafetensorsError, SafetensorsFile
from m1jax.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


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
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({len(problems)} problem"
                                  f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems))
        return param_specs(self.config, self.layout)

    def main_dtype(self) -> str:
        """The most common float dtype among the tensors by bytes ("bfloat16" for the real M1 repo)."""
        totals: dict[str, int] = {}
        for name in self.weight_map:
            info = self.info(name)
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        top = max(totals, key=totals.get) if totals else "F32"
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(top, "float32")
