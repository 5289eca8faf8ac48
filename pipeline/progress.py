"""Progress of long loops: a tqdm bar on a terminal, a log line every N seconds elsewhere.

Under sbatch, nohup or `> log 2>&1` stderr is a file, where tqdm's carriage-return redraws pile
up into one line of megabytes. There `progress_bar(...)` logs `DESC: DONE/TOTAL UNIT (PCT), RATE
UNIT/s, ETA T` through the `salmae` logger (console and run.log) at most every
`SALMAE_PROGRESS_SECONDS` seconds (default 60), plus one closing line for a loop that logged.
`SALMAE_PROGRESS=bar|log|off` overrides the choice (default `auto`: a bar only when stderr is a
TTY). Both kinds take the calls the loops make: iteration, `update(n)`, `set_postfix(**kv)`,
`close()`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from salmae.pipeline.dist import LOGGER_NAME

MODE_ENV = "SALMAE_PROGRESS"                  # auto | bar | log | off
SECONDS_ENV = "SALMAE_PROGRESS_SECONDS"       # seconds between two log lines
DEFAULT_SECONDS = 60.0


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, stream: TextIO | None = None,
             seconds: float | None = None, clock: Callable[[], float] = time.monotonic) -> Any:
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `LogProgress`; `disable`
    (or SALMAE_PROGRESS=off) gives a bar that draws nothing. `total` defaults to len(iterable).
    Log lines go to `stream` when one is given, else through the `salmae` logger."""
    from tqdm import tqdm

    given = stream
    stream = sys.stderr if stream is None else stream
    mode = os.environ.get(MODE_ENV, "auto").strip().lower()
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except (TypeError, NotImplementedError):     # a stream (IterableDataset) need not know its length
            total = None
    if disable or mode == "off":
        return tqdm(iterable, total=total, disable=True)
    if mode == "bar" or (mode != "log" and _is_terminal(stream)):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=stream)
    if seconds is None:
        seconds = _seconds_from_env()
    return LogProgress(iterable, total=total, desc=desc, unit=unit, seconds=seconds, stream=given, clock=clock)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # closed or not a real stream
        return False


def _seconds_from_env() -> float:
    raw = os.environ.get(SECONDS_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 125 -> '2m05s', 9.5 -> '10s'."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LogProgress:
    """Counts work like a tqdm bar and logs a line at most every `seconds` (0: every update): to
    `stream` if given, else through the `salmae` logger (console and run.log, as the stage set it
    up), or to stderr where nothing set that logger up (`salmae manifest build`)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", seconds: float = DEFAULT_SECONDS, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.seconds, self.stream, self.clock = seconds, stream, clock
        self.n, self.lines, self.postfix = 0, 0, ""
        self.started = self.last = clock()
        self.closed = False

    def __iter__(self) -> Iterator:
        # counted when handed out: a loop that stops the iterator itself (`zip(range(n), bar)`) never
        # asks for the item after its last, so counting on the way back would miss that one
        try:
            for item in self.iterable:
                self.update(1)
                yield item
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.seconds:
            self.last = now
            self._emit(self.line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """One closing line (count, time, rate) for a loop long enough to have logged a line."""
        if self.closed:
            return
        self.closed = True
        if self.lines:
            elapsed = self.clock() - self.started
            rate = self.n / elapsed if elapsed > 0 else 0.0
            self._emit(f"{self._prefix()}{self.n:,} {self.unit} done in {format_duration(elapsed)} "
                       f"({rate:.3g} {self.unit}/s){self._postfix()}")

    def line(self, now: float) -> str:
        """'DESC: 1,200/5,000 img (24%), 35.2 img/s, ETA 1m48s, loss=0.41'."""
        elapsed = now - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = max(self.total - self.n, 0)
            eta = format_duration(left / rate) if rate > 0 else "?"
            count = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
            return f"{self._prefix()}{count}, {rate:.3g} {self.unit}/s, ETA {eta}{self._postfix()}"
        return f"{self._prefix()}{self.n:,} {self.unit}, {rate:.3g} {self.unit}/s{self._postfix()}"

    def _prefix(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _postfix(self) -> str:
        return f", {self.postfix}" if self.postfix else ""

    def _emit(self, text: str) -> None:
        self.lines += 1
        logger = logging.getLogger(LOGGER_NAME)
        if self.stream is None and logger.handlers:   # set up by the stage: console (rank 0) and run.log
            logger.info(text)
        else:
            print(text, file=self.stream if self.stream is not None else sys.stderr, flush=True)
