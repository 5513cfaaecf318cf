"""Progress bars for long jobs (tqdm): bytes or items done, rate and remaining time, on stderr."""

from __future__ import annotations

import sys

from tqdm import tqdm


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units, e.g. "1.50MB"."""
    return tqdm.format_sizeof(n, "B", 1000)


def progress_bar(label: str, total: int, done: int = 0, *, unit: str = "B", stream=None, enabled: bool = True
                 ) -> tqdm:
    """A tqdm bar over `total` units of which `done` are already finished (a resumed run: the rate counts only
    this run's work). On a terminal it redraws at most every 0.5 s; in a log, every 10 s, so logs stay short."""
    stream = sys.stderr if stream is None else stream
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(total=total, initial=done, desc=label, unit=unit, unit_scale=unit == "B", unit_divisor=1000,
                file=stream, disable=not enabled, mininterval=0.5 if tty else 10.0, dynamic_ncols=tty,
                ascii=not tty)
