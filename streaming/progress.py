"""Progress of a conversion: bytes, tensors, rate and ETA; a live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Counts written bytes and finished tensors; renders with rich on a TTY, lines every few seconds
    otherwise (CI logs, batch jobs), nothing when quiet."""

    def __init__(self, total_bytes: int, total_tensors: int, done_bytes: int = 0, done_tensors: int = 0,
                 quiet: bool = False, stream=None, line_interval: float = 5.0,
                 verbs: tuple[str, str] = ("converting", "converted")):
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.verbs = verbs  # (live bar, plain lines): e.g. ("writing", "wrote") for `mmrec synth`
        self.bytes, self.tensors = done_bytes, done_tensors
        self.start_bytes = done_bytes
        self.started = time.monotonic()
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.line_interval = line_interval
        self._last_line = self.started  # first line after one interval, not on the first event
        self._bar = None
        if not quiet and self.stream.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._bar = RichProgress(TextColumn(verbs[0]), BarColumn(), DownloadColumn(),
                                     TextColumn("written at"), TransferSpeedColumn(),
                                     TextColumn("{task.fields[tensors]}"),
                                     TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("convert", total=total_bytes, completed=done_bytes,
                                            tensors=self._tensor_text())
            self._bar.start()

    def _tensor_text(self) -> str:
        return f"{self.tensors}/{self.total_tensors} tensors"

    @property
    def rate(self) -> float:
        """Output bytes written per second by this run (the summary's rate counts bytes read too)."""
        elapsed = time.monotonic() - self.started
        return (self.bytes - self.start_bytes) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.verbs[1]} {human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} ({pct:.0f}%), "
                f"{self._tensor_text()}, written {human_bytes(rate)}/s, ETA {eta:.0f}s")

    def advance(self, nbytes: int = 0, tensors: int = 0) -> None:
        self.bytes += nbytes
        self.tensors += tensors
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bytes, tensors=self._tensor_text())
            return
        now = time.monotonic()
        if now - self._last_line >= self.line_interval or self.tensors == self.total_tensors:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
