"""Where a run is, on a terminal and in cluster logs alike.

On a TTY a phase shows a tqdm bar; without one (a batch job's log) a phase prints a line when it
starts (the first time a phase of its name runs in this process, and whenever the previous one
lasted :data:`FIRST_LINE` seconds or more), a line once it has lasted :data:`FIRST_LINE` seconds
and one every :data:`HEARTBEAT` seconds after that. A slow full-size run is never silent; a fast
one (seconds per epoch) prints its first epoch's phases and then only its epoch lines. Epochs
are counted from 1 here (``epoch k/N``); ``metrics.jsonl`` counts them from 0.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

FIRST_LINE = 5.0
"""Seconds after which a phase is long: it prints a line then, and the next phase of its name
announces its start."""
HEARTBEAT = 30.0
"""Seconds between the progress lines of a phase after the first."""


def clock(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(items: Iterable, label: str, enabled: bool, unit: str = "batches") -> Iterator:
    """Yield ``items`` while showing ``label`` (e.g. ``epoch 3/10: sampling``): a tqdm bar on a
    TTY, else lines on stderr as the module docstring says (``epoch 3/10: sampling, 5/16
    batches, 1m02s``). Nothing when not ``enabled``."""
    items = list(items)
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=label, leave=False)
        return
    done, start, stop = 0, time.monotonic(), threading.Event()
    phase = label.split(": ", 1)[-1]

    def say() -> None:
        print(
            f"{label}, {done}/{len(items)} {unit}, {clock(time.monotonic() - start)}",
            file=sys.stderr,
            flush=True,
        )

    def beat() -> None:
        wait = FIRST_LINE
        while not stop.wait(wait):
            wait = HEARTBEAT
            say()

    if _LONG.get(phase, True):  # its first run, or the last one was long
        say()
    thread = threading.Thread(target=beat, daemon=True, name="diffrl-progress")
    thread.start()
    try:
        for item in items:
            yield item
            done += 1
    finally:
        stop.set()
        _LONG[phase] = time.monotonic() - start >= FIRST_LINE


_LONG: dict[str, bool] = {}
"""Per phase name (``sampling``, ``training``), whether its last run in this process was long."""


class EpochClock:
    """The epoch line's ``epoch k/N`` and ETA: the mean time of the epochs this process ran,
    times the epochs left."""

    def __init__(self, num_epochs: int):
        self.num_epochs, self.times, self.start = num_epochs, [], time.monotonic()

    def label(self, epoch: int) -> str:
        """``epoch k/N`` for 0-based ``epoch``."""
        return f"epoch {epoch + 1}/{self.num_epochs}"

    def lap(self, epoch: int) -> str:
        """Record that ``epoch`` ended; ``ETA ...`` for the rest of the run (``done`` after the last)."""
        now = time.monotonic()
        self.times.append(now - self.start)
        self.start = now
        left = self.num_epochs - epoch - 1
        return f"ETA {clock(left * sum(self.times) / len(self.times))}" if left else "done"
