"""The offline loop: an algorithm trained on a data source instead of rollouts (the preference
methods of :mod:`diffrl.algorithms` with ``OFFLINE = True``, on the items their ``setup`` read).

Each epoch is one shuffled pass over the items (or the ``steps_per_epoch`` optimizer steps that
the algorithm's config section asks for), split across processes; per minibatch the algorithm's
``term`` prepares one loss term and the learner (:mod:`diffrl.learner`) updates on it. The run
folder, checkpoints, resume, signals and non-finite guards are the same pieces the online loop
uses (:mod:`diffrl.run`); metrics are the term's stats (loss, implicit accuracy, ...).
"""

from __future__ import annotations

import time

import torch

from diffrl.algorithms import Context
from diffrl.errors import ConfigError
from diffrl.learner import build_learner, process_mean
from diffrl.progress import EpochClock, progress
from diffrl.run import Run, StopSignals, Streams


def steps_per_epoch(num_items: int, config, section: str | None, num_processes: int) -> int:
    """Optimizer steps of one epoch: the whole steps that fit in the items, at most the
    ``steps_per_epoch`` of the algorithm's config ``section`` (when it has one)."""
    t = config.train
    per_step = t.batch_size * t.gradient_accumulation_steps * num_processes
    limit = getattr(getattr(config, section, None), "steps_per_epoch", None) if section else None
    steps = min(num_items // per_step, limit or num_items)
    if steps == 0:
        raise ConfigError(
            f"train.batch_size: {num_items} training items are fewer than one optimizer step needs "
            f"(train.batch_size x gradient_accumulation_steps x processes = {per_step})"
        )
    return steps


def train_offline(config, algorithm, accelerator, reward_fn, data: list, evaluation, stop: StopSignals):
    """The epochs of an offline algorithm over ``data`` (what its ``setup`` returned), with the
    evaluation rewards (:func:`~diffrl.run.evaluation_rewards`) sampled as online runs do; returns
    the pipeline with the trained weights."""
    streams = Streams.seeded(config.run.seed, accelerator.process_index)
    learner = build_learner(config, accelerator)
    run = Run(config, learner, None, streams, reward_fn, [item.prompt for item in data[:16]], evaluation)
    ctx = Context(config, accelerator, run.dir, data)
    t = config.train
    per_step = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    count = steps_per_epoch(len(data), config, algorithm.section, accelerator.num_processes) * per_step
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps
    clock = EpochClock(config.run.num_epochs)
    for epoch in run.epochs:
        evaluated = run.evaluate(epoch, after_training=False)
        t0, totals, terms, skipped = time.perf_counter(), {}, 0, learner.guard.skipped
        order = torch.randperm(len(data), generator=streams.shuffle)[:count]
        local = order[accelerator.process_index :: accelerator.num_processes]
        learner.unet.train()
        batches = local.split(t.batch_size)
        label = f"{clock.label(epoch)}: training"
        for b, rows in enumerate(progress(batches, label, accelerator.is_local_main_process, "minibatches")):
            term = algorithm.term(ctx, learner, [data[i] for i in rows.tolist()], streams)
            for k, v in learner.update(term, f"epoch {epoch}", f"minibatch {b}").items():
                totals[k] = totals.get(k, 0.0) + v
            terms += 1
        learner.unet.eval()
        record = {
            "epoch": epoch,
            **process_mean({k: v / terms for k, v in totals.items()}, accelerator),
            "num_pairs": len(order),  # items trained this epoch
            "skipped_steps": learner.guard.skipped - skipped,
            "learning_rate": learner.optimizer.param_groups[0]["lr"],
            "time_training": time.perf_counter() - t0,
            **evaluated,
            **run.evaluate(epoch, after_training=True),
        }
        stats = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k in totals)
        accelerator.print(
            f"{clock.label(epoch)}: {stats}, {record['time_training']:.1f}s, {clock.lap(epoch)}", flush=True
        )
        run.log_epoch(epoch, record, curve="accuracy")
        run.end_epoch(epoch, stop)
    return run.finish()
