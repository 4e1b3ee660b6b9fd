"""Progress of a long phase (SVD, scoring, training, a download): a tqdm bar when stderr is a terminal;
elsewhere (a log file, a pipe, a job scheduler, where tqdm shows nothing) a plain line on stderr now and
then, so that a job without a terminal is never silent for minutes:

    held-out loss: 8/16 batches (50%) after 31 s, ~31 s left

A line comes when another tenth of the work is done (at least EVERY/10 s after the last line), or EVERY
seconds after the last line; a phase shorter than EVERY/10 s prints nothing. EVERY is 15 s unless
report_every(seconds) set another (`sigmatune --progress-seconds S <command>` does).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

EVERY = 15.0  # seconds between plain lines at the most, unless report_every set another
_every = EVERY


class Progress:
    """update(n), set_postfix(**values), close(), and n (the work done so far), as a tqdm bar has.

    show: None (the default) = a bar on a terminal, plain lines elsewhere; True = a bar in any case;
    False = nothing."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        show: bool | None = None,
        initial: int = 0,
        unit_scale: bool = False,
        leave: bool = True,
    ):
        terminal = getattr(sys.stderr, "isatty", lambda: False)()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            unit_scale=unit_scale,
            leave=leave,
            dynamic_ncols=True,
            disable=not (show or (show is None and terminal)),
        )
        self.plain = show is None and not terminal
        self.total, self.desc, self.unit, self.scaled = total, desc, unit, unit_scale
        self.n = self.reported = self.first = initial
        self.every = _every
        self.started = self.last = time.monotonic()
        self.postfix: dict[str, object] = {}
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.plain and self._due(time.monotonic()):
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = values
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()
        done = self.n != self.reported and (self.lines or time.monotonic() - self.started >= self.every / 10)
        if self.plain and done:
            self._line()

    def _due(self, now: float) -> bool:
        since = now - self.last
        tenth = self.total and (self.n - self.reported) * 10 >= self.total
        return since >= self.every or bool(tenth and since >= self.every / 10)

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        text = f"{self.desc}: {self._count(self.n)}"
        if self.total:
            text += f"/{self._count(self.total)} {self.unit} ({100 * self.n // self.total}%)"
        else:
            text += f" {self.unit}"
        text += f" after {elapsed:.0f} s"
        if self.total and self.first < self.n < self.total:
            text += f", ~{elapsed / (self.n - self.first) * (self.total - self.n):.0f} s left"
        text += "".join(f", {name} {value}" for name, value in self.postfix.items())
        print(text, file=sys.stderr, flush=True)
        self.reported, self.last, self.lines = self.n, now, self.lines + 1

    def _count(self, n: int) -> str:
        return tqdm.format_sizeof(n) if self.scaled else str(n)


def report_every(seconds: float) -> float:
    """Plain lines at most this many seconds apart (0: as often as a tenth of the work allows) for every
    Progress made from now on; returns the previous setting."""
    global _every
    if not seconds >= 0:
        raise ValueError(f"progress lines need a number of seconds ≥ 0 between them, got {seconds}")
    previous, _every = _every, float(seconds)
    return previous
