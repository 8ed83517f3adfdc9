"""A run: its folder (config.yaml, metrics.jsonl, sample grids, report, checkpoints, exported
weights), resuming, the random streams, stop signals, and the per-epoch outputs, which a worker
thread writes while the next epoch samples.

    RUN_DIR/config.yaml  metrics.jsonl  reward_curve.png  report.html  samples/*.png
            checkpoints/epoch_EEEE/   lora/ (diffusers format) or unet/ (full fine-tuning)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from diffrl import runfolder
from diffrl.checkpoints import (
    load_checkpoint,
    load_tensors,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    trainable_state,
)
from diffrl.collect import sample_batch, sampler_settings, score_images
from diffrl.config import dump_yaml, to_dict
from diffrl.configfile import flatten
from diffrl.errors import RunStopped
from diffrl.evaluation import evaluate_suite
from diffrl.files import (
    append_jsonl,
    atomic_write_bytes,
    image_grid,
    line_chart,
    read_jsonl,
    save_png,
    truncate_metrics,
)
from diffrl.report import write_report
from diffrl.rollout import sample_trajectories
from diffrl.sharding import sharded
from diffrl.transitions import denoiser, family

EMA_FILE = "ema.safetensors"
"""The checkpoint file of the moving average (``train.ema``)."""
ALGORITHM_FILE = "algorithm.safetensors"
"""The checkpoint file of an algorithm state's tensors (its ``tensor_state``: NFT's old policy)."""


@dataclass
class Streams:
    """This process's random streams; their states go into every checkpoint."""

    prompts: torch.Generator
    sampling: torch.Generator
    shuffle: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int) -> Streams:
        return cls(*(torch.Generator().manual_seed(seed + 100_003 * rank + 7_919 * s) for s in range(3)))

    def state(self) -> dict:
        return {name: getattr(self, name).get_state() for name in ("prompts", "sampling", "shuffle")}

    def load(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).set_state(value)


class StopSignals:
    """Within ``with``: the first SIGINT/SIGTERM asks the run to stop at the end of the current
    epoch with a checkpoint; a second one acts at once as it would have (the newest complete
    checkpoint is kept either way). Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.received, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(
            f"diffrl: {signal.Signals(signum).name} received; stopping after this epoch with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def requested(self, accelerator) -> int:
        """The signal any process received (0: none); every process gets the same answer."""
        received = torch.tensor([self.received], device=accelerator.device)
        return (
            int(accelerator.gather(received).max().item()) if accelerator.num_processes > 1 else self.received
        )


def set_deterministic(enabled: bool) -> bool:
    """``torch.use_deterministic_algorithms(enabled)`` (with the cuBLAS workspace it needs on CUDA);
    returns the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    return previous


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by the complete folder ``tmp`` (``final.old`` holds the previous
    one for the moment between the two renames; a crash there leaves both findable)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_weights(pipe, use_lora: bool, run_dir: Path, main: bool = True) -> None:
    """Write the trained weights for use outside diffrl, replacing the previous export only once
    the new one is complete: ``run_dir/lora`` in diffusers format
    (``pipe.load_lora_weights(run_dir / "lora")``: the UNet's layers for SD and LCMs, the
    transformer's for SD3 and FLUX, saved by the pipeline class's own ``save_lora_weights``), or
    ``run_dir/unet`` / ``run_dir/transformer`` after full fine-tuning (``from_pretrained``
    folders). Under FSDP every process calls it (the shards are gathered) and ``main`` writes."""
    from peft.utils import get_peft_model_state_dict

    model = denoiser(pipe)
    whole = trainable_state(model, keep=main) if use_lora or sharded(model) else None
    if not main:
        return
    part = "transformer" if family(pipe) == "flow" else "unet"
    name = "lora" if use_lora else part
    tmp = run_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if use_lora:
        # PEFT's key names (``lora_A``/``lora_B``), as diffusers' own SD3 and FLUX LoRA scripts save
        # them; its old-format conversion renames only to_q/k/v/out, and a file mixing both formats
        # loads without the renamed layers.
        layers = get_peft_model_state_dict(model, state_dict=whole)
        type(pipe).save_lora_weights(
            tmp,
            safe_serialization=True,
            **{
                f"{part}_lora_layers": {k: v.float() for k, v in layers.items()},
                f"{part}_lora_adapter_metadata": model.peft_config["default"].to_dict(),
            },
        )
    elif whole is not None:  # FSDP: the gathered parameters and the (unsharded) persistent buffers
        buffers = {
            f"{path}.{name}".lstrip("."): b.detach().cpu().contiguous()
            for path, module in model.named_modules()
            for name, b in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set
        }
        tmp.mkdir(parents=True)
        model.save_config(tmp)
        save_file({**whole, **buffers}, str(tmp / "diffusion_pytorch_model.safetensors"))
    else:
        model.save_pretrained(tmp)
    _swap_in(tmp, run_dir / name)


def evaluation_rewards(config, training_prompts: list[str]) -> tuple[list, list[str], tuple | None]:
    """The run's evaluation rewards ``[(label, reward)]``, their prompts (``eval.prompts``, else the
    training ones) and its GenEval suite ``(rows, detector, thresholds)`` (``eval.suite``, else
    None), built in preflight so that a bad name, file or missing weights fail before any model loads."""
    from diffrl import rewards
    from diffrl.evaluation import load_suite, suite_detector
    from diffrl.prompts import load_prompts

    e = config.eval
    built = [
        (spec.get("label", spec["name"]), rewards.get(spec["name"], **spec.get("kwargs", {})))
        for spec in e.rewards
    ]
    prompts = load_prompts(e.prompts).prompts if e.prompts else training_prompts
    suite = (load_suite(e.suite), *suite_detector(e.detector)) if e.suite else None
    return built, prompts, suite


class Run:
    """One run's folder and lifecycle around a :class:`~diffrl.learner.Learner`.

    Opening creates the folder (or, resuming, restores weights, optimizer, random streams and the
    algorithm's ``state`` from the newest checkpoint, and drops metrics of later epochs so none are
    duplicated); ``start_epoch`` is the first epoch to run. Every process makes one; only the main
    process writes files. Per-epoch outputs go to a worker thread (:meth:`log_epoch`); checkpoints
    and the end of the run wait for it."""

    def __init__(
        self,
        config,
        learner,
        state,
        streams: Streams,
        reward_fn,
        grid_prompts: list[str],
        evaluation=((), (), None),
    ):
        """``evaluation``: :func:`evaluation_rewards` (none for offline runs)."""
        self.config, self.learner, self.state, self.streams = config, learner, state, streams
        self.reward_fn, self.grid_prompts = reward_fn, grid_prompts
        self.eval_rewards, self.eval_prompts, self.eval_suite = evaluation
        self.accelerator = accelerator = learner.accelerator
        self.main = accelerator.is_main_process
        self.dir, self.start_epoch = Path(config.run.output_dir) / config.run.name, 0
        self.outputs = ThreadPoolExecutor(max_workers=1)
        self.pending = []
        changes = {}
        if config.run.resume_from:
            self.dir, checkpoint = resolve_resume(config.run.resume_from)
            changes = runfolder.check_resume(config, self.dir)
            if checkpoint is not None:
                saved, rng = load_checkpoint(
                    checkpoint, denoiser(learner.pipe), learner.optimizer, accelerator.process_index
                )
                streams.load(rng)
                if hasattr(state, "load_state_dict") and saved.get("tracker"):
                    state.load_state_dict(saved["tracker"])
                learner.merge_sampling = saved.get("merge_sampling", learner.merge_sampling)
                if learner.ema is not None:
                    learner.ema.load_state_dict(
                        load_tensors(checkpoint, EMA_FILE), str(checkpoint / EMA_FILE)
                    )
                if hasattr(state, "load_tensor_state"):
                    state.load_tensor_state(
                        load_tensors(checkpoint, ALGORITHM_FILE), str(checkpoint / ALGORITHM_FILE)
                    )
                self.start_epoch = saved["epoch"] + 1
        if self.main:
            if config.run.overwrite and not config.run.resume_from:
                runfolder.clear_for_new_run(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "config.yaml").is_file():  # a resume keeps the config the run began with
                atomic_write_bytes(self.dir / "config.yaml", dump_yaml(config).encode())
            if config.run.resume_from:
                runfolder.record_resume(self.dir, self.start_epoch, changes)
                truncate_metrics(self.dir / "metrics.jsonl", self.start_epoch - 1)
        if config.run.log_with != "none":
            tracked = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(to_dict(config)).items()
            }
            accelerator.init_trackers(config.run.name, config=tracked)
        accelerator.wait_for_everyone()
        if self.start_epoch == 0:
            self.grid("before.png")
        if self.start_epoch >= config.run.num_epochs:
            self.export()  # killed after its last checkpoint

    @property
    def epochs(self) -> range:
        return range(self.start_epoch, self.config.run.num_epochs)

    def grid(self, name: str) -> None:
        """``samples/NAME``: the first 16 grid prompts sampled from a fixed seed, with rewards
        (before.png, middle.png, after.png; ``report.html`` shows them side by side). Every process
        calls it; the main one samples, scores and saves it, under FSDP with the others taking part
        in the sampling (its forward passes gather the shards)."""
        if not (self.main or sharded(denoiser(self.learner.pipe))):
            return
        prompts = [self.grid_prompts[i % len(self.grid_prompts)] for i in range(16)]
        print(f"diffrl: sampling the fixed-seed grid samples/{name}", file=sys.stderr, flush=True)
        pipe = self.learner.pipe
        with self.averaged():
            traj = sample_batch(
                pipe, self.config, prompts, torch.Generator().manual_seed(self.config.run.seed)
            )
        if not self.main:
            return
        values = score_images(self.reward_fn, traj, self.config, f"sample grid {name}")
        captions = [f"{p}\nreward {v:.3f}" for p, v in zip(prompts, values.tolist())]
        self._later(save_png, image_grid(traj.images, captions), self.dir / "samples" / name)

    def evaluate(self, epoch: int, after_training: bool) -> dict[str, float]:
        """``{"eval_<label>": mean, "evaluation_after_epochs": n}`` of each evaluation reward (section
        ``eval``) on its fixed prompts and seed with the averaged weights after ``n`` trained
        epochs, and with ``eval.suite`` its GenEval Overall ``eval_geneval`` and task accuracies
        ``geneval_<task>`` (:func:`~diffrl.evaluation.evaluate_suite`, the suite's own draw from
        the seed): before the training of every ``eval.every``-th epoch (so epoch 0's is the
        pretrained model's) and after the training of the last; ``{}`` otherwise. Every process
        calls it and gets the main process's values; the main one samples (under FSDP all take part)."""
        e = self.config.eval
        last = epoch == self.config.run.num_epochs - 1
        due = last if after_training else epoch % e.every == 0
        if not (self.eval_rewards or self.eval_suite) or not due:
            return {}
        values = {}
        if self.main or sharded(denoiser(self.learner.pipe)):
            settings = replace(
                sampler_settings(self.config),
                num_steps=e.num_steps or self.config.sample.num_steps,
                eta=self.config.sample.eta if e.eta is None else e.eta,
            )
            with self.averaged():
                values.update(self._evaluation_rewards(settings, epoch))
                if self.eval_suite:
                    table = evaluate_suite(
                        self.learner.pipe,
                        *self.eval_suite,
                        settings,
                        images_per_prompt=e.images_per_prompt,
                        seed=e.seed,
                    )
                    values["eval_geneval"] = table.pop("overall")["accuracy"]
                    values.update(
                        {f"geneval_{tag}": v["accuracy"] for tag, v in table.items() if isinstance(v, dict)}
                    )
            values["evaluation_after_epochs"] = epoch + int(after_training)
        if self.accelerator.num_processes > 1:
            values = broadcast_object_list([values])[0]
        return values

    def _evaluation_rewards(self, settings, epoch: int) -> dict[str, float]:
        """``{"eval_<label>": mean}`` of each evaluation reward on ``eval.num_images`` images of its
        prompts (cycled in order) sampled with ``settings`` from ``eval.seed``."""
        if not self.eval_rewards:
            return {}
        e, chunk = self.config.eval, self.config.sample.batch_size
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(e.num_images)]
        generator = torch.Generator().manual_seed(e.seed)
        trajs = [
            sample_trajectories(self.learner.pipe, prompts[i : i + chunk], settings, generator=generator)
            for i in range(0, len(prompts), chunk)
        ]
        values = {}
        for label, reward in self.eval_rewards:
            where = f"evaluation reward {label}, epoch {epoch}"
            scores = torch.cat([score_images(reward, traj, self.config, where) for traj in trajs])
            values[f"eval_{label}"] = scores[torch.isfinite(scores)].mean().item()
        return values

    def averaged(self):
        """Inside the block the denoiser holds the moving average of its trained weights when the
        run keeps one (``train.ema``), else its own weights."""
        return self.learner.ema.applied() if self.learner.ema is not None else nullcontext()

    def export(self) -> None:
        """:func:`export_weights` of the averaged weights (``train.ema``) or the trained ones (every
        process calls it; the main one writes)."""
        with self.averaged():
            export_weights(self.learner.pipe, self.config.model.use_lora, self.dir, self.main)

    def _later(self, fn, *args) -> None:
        self.pending = [f for f in self.pending if not f.done()] + [self.outputs.submit(fn, *args)]

    def flush(self) -> None:
        """Wait for the outputs in flight (raising what they raised)."""
        for future in self.pending:
            future.result()
        self.pending = []

    def log_epoch(
        self, epoch: int, record: dict, traj=None, rewards=None, curve: str = "reward_mean"
    ) -> None:
        """The epoch's record to the trackers and ``metrics.jsonl`` (at once, append-only); its
        sample grid (first 16 of ``traj`` with ``rewards``), the ``curve`` chart and the report
        written by the worker thread; ``samples/middle.png`` after the middle epoch."""
        self.accelerator.log(record, step=epoch)
        if self.main:
            append_jsonl(self.dir / "metrics.jsonl", record)
            if traj is not None:
                count = min(16, len(traj))
                captions = [
                    f"{p}\nreward {r:.3f}" for p, r in zip(traj.prompts[:count], rewards[:count].tolist())
                ]
                grid_images = traj.images[:count].clone()
                self._later(
                    lambda: save_png(
                        image_grid(grid_images, captions), self.dir / "samples" / f"epoch_{epoch:04d}.png"
                    )
                )
            self._later(self._charts, curve)
        if epoch == self.config.run.num_epochs // 2:
            self.grid("middle.png")

    def _charts(self, curve: str) -> None:
        values = [r.get(curve) for r in read_jsonl(self.dir / "metrics.jsonl")]
        save_png(
            line_chart(values, curve.replace("_", " ") + " per epoch"),
            self.dir / f"{curve.split('_')[0]}_curve.png",
        )
        write_report(self.dir)

    def end_epoch(self, epoch: int, stop: StopSignals, checkpoint: bool = False) -> None:
        """Checkpoint when ``run.save_freq`` says so, after the last epoch, when asked
        (``checkpoint``) or when a stop signal came; after a signal, end the run with
        :class:`RunStopped` once that checkpoint is complete."""
        signum = stop.requested(self.accelerator)
        last = epoch == self.config.run.num_epochs - 1
        if signum or checkpoint or last or (epoch + 1) % self.config.run.save_freq == 0:
            self.save(epoch)
        self.accelerator.wait_for_everyone()
        if signum:
            self.flush()
            self.accelerator.end_training()
            raise RunStopped(signum, self.dir, epoch)

    def save(self, epoch: int) -> None:
        """Checkpoint after ``epoch`` (every process takes part), prune old ones, export the weights."""
        learner, accelerator = self.learner, self.accelerator
        self.flush()
        tracker = self.state.state_dict() if hasattr(self.state, "state_dict") else None
        tensors = {EMA_FILE: learner.ema.state_dict(keep=self.main)} if learner.ema is not None else {}
        if hasattr(self.state, "tensor_state"):
            tensors[ALGORITHM_FILE] = self.state.tensor_state(keep=self.main)
        save_checkpoint(
            self.dir,
            epoch,
            denoiser(learner.pipe),
            learner.optimizer,
            self.streams.state(),
            {"tracker": tracker, "merge_sampling": learner.merge_sampling},
            accelerator.process_index,
            self.main,
            accelerator.wait_for_everyone,
            tensors,
        )
        if self.main:
            prune_checkpoints(self.dir, self.config.run.keep_last)
        self.export()

    def finish(self):
        """After the last epoch: ``samples/after.png``, the report, the trackers closed; returns
        the pipeline holding the trained weights (their moving average with ``train.ema``)."""
        self.grid("after.png")
        if self.main:
            self.flush()
            write_report(self.dir)
        self.outputs.shutdown()
        self.accelerator.end_training()
        if self.learner.ema is not None:
            self.learner.ema.copy_to_params()
        return self.learner.pipe
