"""What the benchmark scripts (``bench.py``, ``compare.py``) share: running one measurement in a
fresh process, so that its peak memory is its own, and counting an online epoch's reward queries."""

from __future__ import annotations

import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def peak_memory_mb() -> float:
    """This process's peak: CUDA memory allocated if CUDA was used, else its resident set's high
    water mark (Linux ``VmHWM``; ``ru_maxrss`` elsewhere, which a spawned child may inherit from
    its parent) in MB."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and BSD report KB


def _measured(fn, args: tuple) -> dict:
    return {**fn(*args), "peak_memory_mb": peak_memory_mb()}


def isolated(fn, *args) -> dict:
    """``fn(*args)`` (a module-level function returning a dict) in a fresh spawned process; its
    result with ``peak_memory_mb`` of that process added."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measured, fn, args).result()


def _one_thread() -> None:
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def isolated_many(calls: list[tuple], jobs: int, done=None) -> list[dict]:
    """Each ``(fn, *args)`` of ``calls`` as :func:`isolated` does, ``jobs`` fresh processes at a
    time (with one torch thread each when ``jobs`` > 1, so that they share the cores instead of
    oversubscribing them); a call that raises gives ``{"error": message}``. ``done(index,
    result)`` is called as each finishes. Results in call order."""

    def result_of(future) -> dict:
        try:
            return future.result()
        except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the others
            return {"error": f"{type(err).__name__}: {err}"}

    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_one_thread if jobs > 1 else None,
        max_tasks_per_child=1,
    ) as pool:
        futures = {pool.submit(_measured, call[0], call[1:]): i for i, call in enumerate(calls)}
        results = [None] * len(calls)
        for future in as_completed(futures):
            results[futures[future]] = result_of(future)
            if done is not None:
                done(futures[future], results[futures[future]])
        return results


def queries_per_epoch(config) -> int:
    """Images an online epoch samples and scores: prompts per batch × images per prompt (D3PO's
    group, B²-DiffuRL's branches) × batches."""
    from diffrl import algorithms

    s = config.sample
    return (
        s.batch_size * algorithms.get(config.algorithm).plan(config, 0).num_branches * s.num_batches_per_epoch
    )
