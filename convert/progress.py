"""A plain-text progress line for long conversions: bytes done, throughput and ETA, on stderr."""

from __future__ import annotations

import sys
import threading
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def human_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress over `total` bytes of which `done` are already finished (a resumed run).

    On a terminal the line is redrawn in place (at most `interval` s apart); otherwise one line is printed every
    `interval` s (default 10 s) and at the end, so logs stay short. The rate counts only this run's bytes.
    """

    def __init__(self, label: str, total: int, done: int = 0, *, items: int = 0, items_done: int = 0,
                 stream=None, enabled: bool = True, interval: float | None = None):
        self.label, self.total, self.done = label, total, done
        self.items, self.items_done = items, items_done
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.start = time.monotonic()
        self.start_done = done
        self._last = 0.0
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = self.total - self.done
        eta = human_seconds(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        items = f"  [{self.items_done}/{self.items} blocks]" if self.items else ""
        return (f"{self.label}: {pct:5.1f}%  {human_bytes(self.done)} / {human_bytes(self.total)}  "
                f"{human_bytes(rate)}/s  ETA {eta}  elapsed {human_seconds(elapsed)}{items}")

    def advance(self, nbytes: int, items: int = 1) -> None:
        with self._lock:
            self.done += nbytes
            self.items_done += items
            now = time.monotonic()
            if self.enabled and now - self._last >= self.interval:
                self._last = now
                self._emit()

    def _emit(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            if self.enabled:
                self._emit(final=True)
