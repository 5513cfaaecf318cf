"""A converted m1jax checkpoint directory: what it contains, how to tell a complete one, how to read it.

    DST/config.json               the source config.json, byte for byte
    DST/tokenizer.json, ...       the source's tokenizer / generation files
    DST/params/                   an orbax checkpoint of the NNX parameter state (see `orbax_store`)
    DST/m1jax_checkpoint.json     the commit marker, written last: format, dtype, quantize (if any), parameters,
                                  source fingerprint
    DST/.m1jax-convert-journal.jsonl   only while a conversion is unfinished (removed after the marker is written)

With `quantize: "int8-experts"` in the marker, each expert weight `layers.N.block_sparse_moe.w1` is stored int8
beside its fp32 scales `...w1_scale` (`m1jax.quantize`).

A directory without the marker is never read as a checkpoint: if it carries a journal or `params/`, it is an
interrupted conversion and every reader refuses it with `IncompleteCheckpointError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from m1jax.convert.errors import IncompleteCheckpointError
from m1jax.convert.hf_checkpoint import CheckpointError
from m1jax.convert.hf_layout import ORIGINAL, param_specs
from m1jax.convert.orbax_store import ArrayView, OrbaxArrayStore, array_key

from m1jax.config import QUANTIZE_MODES, ModelConfig
from m1jax.quantize import is_expert_weight_path, scale_path

MARKER = "m1jax_checkpoint.json"
PARAMS = "params"
JOURNAL = ".m1jax-convert-journal.jsonl"
FORMAT = "m1jax-orbax-checkpoint"
FORMAT_VERSION = 1

COMPLETE, INCOMPLETE, ABSENT, EMPTY, OTHER = "complete", "incomplete", "absent", "empty", "other"


def directory_state(path: str | os.PathLike) -> str:
    """"complete" (marker present), "incomplete" (journal or params/ without marker), "absent", "empty" or
    "other" (anything else, e.g. an HF checkpoint)."""
    path = Path(path)
    if not path.exists():
        return ABSENT
    if not path.is_dir():
        return OTHER
    if (path / MARKER).is_file():
        return COMPLETE
    if (path / JOURNAL).exists() or (path / PARAMS).exists():
        return INCOMPLETE
    return EMPTY if not any(path.iterdir()) else OTHER


def incomplete_message(path: Path) -> str:
    return (f"{path} holds an incomplete m1jax conversion (no {MARKER} commit marker: the conversion was "
            f"interrupted or is still running); rerun `m1jax convert SRC {path}` with the same arguments to "
            f"finish it")


class M1jaxCheckpoint:
    """A complete converted checkpoint: `config`, `dtype` (storage dtype), `quantize` (None or "int8-experts"),
    `marker`, and lazy parameter views."""

    def __init__(self, path: str | os.PathLike, **runtime):
        self.path = Path(path)
        state = directory_state(self.path)
        if state == INCOMPLETE:
            raise IncompleteCheckpointError(incomplete_message(self.path))
        if state != COMPLETE:
            raise CheckpointError(f"{self.path}: not an m1jax checkpoint (no {MARKER})")
        try:
            self.marker = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path / MARKER}: unreadable commit marker ({e})") from None
        if self.marker.get("format") != FORMAT or self.marker.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{self.path / MARKER}: unsupported format {self.marker.get('format')!r} "
                                  f"version {self.marker.get('version')!r} (this m1jax reads {FORMAT} "
                                  f"version {FORMAT_VERSION})")
        self.config = ModelConfig.from_json_file(self.path / "config.json", **runtime)
        self.dtype = self.marker["dtype"]
        self.quantize = self.marker.get("quantize")
        if self.quantize not in QUANTIZE_MODES:
            raise CheckpointError(f"{self.path / MARKER}: unknown quantize {self.quantize!r} (this m1jax reads "
                                  f"{QUANTIZE_MODES})")
        self.store = OrbaxArrayStore(self.path / PARAMS)

    @property
    def params_dir(self) -> Path:
        return self.path / PARAMS

    def views(self, config: ModelConfig | None = None) -> dict[tuple, ArrayView]:
        """`{NNX param path: lazy view}` for every parameter of `config` as stored (an int8 checkpoint: int8 expert
        weights and their scales); raises `CheckpointError` listing every missing or mis-shaped parameter."""
        config = config or self.config
        stored = self.marker.get("parameters", {})
        problems, views = [], {}
        expected = [(spec.path, spec.shape) for spec in param_specs(config, ORIGINAL)]
        if self.quantize is not None:
            expected += [(scale_path(p), (shape[0], shape[2])) for p, shape in expected if is_expert_weight_path(p)]
        for path, shape in expected:
            key = array_key(path)
            if key not in stored:
                problems.append(f"missing parameter {key!r} (expected shape {list(shape)})")
            elif tuple(stored[key]["shape"]) != shape:
                problems.append(f"parameter {key!r} has shape {stored[key]['shape']}, config implies "
                                f"{list(shape)}")
            else:
                views[path] = ArrayView(self.store, key)
        if problems:
            raise CheckpointError(f"m1jax checkpoint {self.path} does not match its config ({len(problems)} "
                                  f"problem{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems[:50]))
        return views
