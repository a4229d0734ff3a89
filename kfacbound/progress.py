"""One progress-bar style for every long loop, on stderr.

- On a terminal: a tqdm bar that refreshes in place (at most twice a second).
- When stderr is a file or a pipe (batch logs, ``make demo > log``): no carriage returns, only a
  few plain lines — one at every tenth of the work (or every ``interval`` seconds when the total
  is unknown) and one summary line at the end with the elapsed time and the last postfix values.

``enabled=False`` (``--no-progress``) prints nothing. The object has the tqdm methods the package
uses: iteration, ``update``, ``set_postfix``, ``set_description``, ``close`` and ``with``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm

#: Lines printed over the whole loop when stderr is not a terminal (plus the summary line).
LOG_LINES = 10


class LineProgress:
    """Progress as a few newline-terminated lines (for log files); tqdm's interface subset."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", file: IO[str] | None = None,
                 interval: float = 60.0, lines: int = LOG_LINES) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interval, self.lines = float(interval), max(1, int(lines))
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = self._last_time = time.perf_counter()
        self._next_mark = 1
        self.closed = False

    # -- tqdm-like interface -------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.total:
            mark = self.n * self.lines // self.total
            if mark >= self._next_mark and self.n < self.total:
                self._next_mark = mark + 1
                self._emit(now)
        elif now - self._last_time >= self.interval:
            self._emit(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._emit(time.perf_counter(), final=True)

    # -- output --------------------------------------------------------------------------------
    def _emit(self, now: float, final: bool = False) -> None:
        self._last_time = now
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        post = "".join(f" {k}={v}" for k, v in self.postfix.items())
        tag = "done" if final else "at"
        print(f"{self.desc}: {tag}{pct} ({done} {self.unit}) {elapsed:.1f}s{rate}{post}",
              file=self.file, flush=True)


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True,
                 unit: str = "it", iterable: Iterable | None = None,
                 file: IO[str] | None = None, **kwargs: Any) -> tqdm | LineProgress:
    """A progress bar over ``iterable`` or ``total`` steps: tqdm on a terminal, a few log lines
    otherwise (see the module docstring), nothing when ``enabled`` is false."""
    stream = file if file is not None else sys.stderr
    interactive = getattr(stream, "isatty", lambda: False)()
    if enabled and not interactive:
        return LineProgress(iterable, total=total, desc=desc, unit=unit, file=stream)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit,
                dynamic_ncols=True, mininterval=0.5, leave=kwargs.pop("leave", True), file=stream,
                **kwargs)
