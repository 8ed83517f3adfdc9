"""Where a run is, on a terminal and in cluster logs alike.

On a TTY a phase shows a tqdm bar; without one (a batch job's log) a phase that lasts longer than
:data:`FIRST_LINE` seconds prints a line then and one every :data:`HEARTBEAT` seconds while it
lasts, so that a slow full-size run is never silent and a fast one (seconds per epoch) prints
only its epoch lines. Epochs are counted from 1 here (``epoch k/N``); ``metrics.jsonl`` counts
them from 0.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

FIRST_LINE = 5.0
"""Seconds into a phase before its first progress line without a TTY (0: a line at its start)."""
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
    TTY, else lines on stderr after :data:`FIRST_LINE` seconds and every :data:`HEARTBEAT`
    seconds after that (``epoch 3/10: sampling, 5/16 batches, 1m02s``). Nothing when not
    ``enabled``."""
    items = list(items)
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=label, leave=False)
        return
    done, start, stop = 0, time.monotonic(), threading.Event()

    def say() -> None:
        print(
            f"{label}, {done}/{len(items)} {unit}, {clock(time.monotonic() - start)}",
            file=sys.stderr,
            flush=True,
        )

    def beat() -> None:
        wait = FIRST_LINE if FIRST_LINE > 0 else HEARTBEAT
        while not stop.wait(wait):
            wait = HEARTBEAT
            say()

    if FIRST_LINE <= 0:  # announce every phase at its start
        say()
    thread = threading.Thread(target=beat, daemon=True, name="diffrl-progress")
    thread.start()
    try:
        for item in items:
            yield item
            done += 1
    finally:
        stop.set()


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
