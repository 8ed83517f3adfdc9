"""The learner's guards: optimizer steps skipped for non-finite values (and the run stopped after
too many in a row), and the check that re-scoring stored actions with the unchanged policy gives
PPO ratios of 1."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from diffrl.errors import NumericalError
from diffrl.sharding import full_tensor, local_tensor


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for non-finite values; stops the run after ``limit`` in a row."""

    limit: int
    in_a_row: int = 0
    skipped: int = 0

    def record(self, fault: str | None, where: str) -> None:
        """Note one optimizer step: ``fault`` says what went non-finite (None: the step was taken)."""
        if fault is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        warnings.warn(f"skipped an optimizer step: {fault} ({where})", RuntimeWarning, stacklevel=2)
        if self.in_a_row >= self.limit:
            raise NumericalError(
                f"{self.in_a_row} optimizer steps in a row were skipped (train.max_nonfinite_steps={self.limit}); "
                f"the last: {fault} ({where}). Lower train.learning_rate, check the reward's scale, or use "
                "model.mixed_precision=no"
            )


def check_log_ratios(log_ratio: torch.Tensor, config, accelerator, epoch: int) -> float:
    """Before an epoch's first update the policy is still the one that sampled, so re-scoring the
    stored actions must give ratio 1 up to float noise; otherwise PPO's clipping compares against
    the wrong old policy. ``log_ratio [B]`` is log πθ − the stored log-prob of the epoch's first
    training term (the training forward itself: no extra UNet call). Returns the mean |log ratio|
    over all processes; raises :class:`NumericalError` naming the likely cause when it exceeds
    ``train.ratio_tolerance``.

    The mean, not the max: on GPUs the noise alone reaches a max of 1.5e-3 in fp32 (TF32
    convolutions, batch-size-dependent kernels) and 0.07 in bf16 at the smallest σ_t, with means
    of 2e-4 and 2e-3 (``scripts/ratio_check.py`` on an H200). A real mismatch is far above:
    re-scoring the shipped tiny model's 4-step chains at guidance 4 instead of 5 gives a mean of
    0.07, at eta 0.8 instead of 1 0.2."""
    tolerance = config.train.ratio_tolerance
    mean = accelerator.gather(log_ratio.detach().abs().mean().reshape(1).to(accelerator.device)).mean().item()
    if tolerance == 0 or mean <= tolerance:
        return mean
    m = config.model
    cause = (
        f"model.mixed_precision={m.mixed_precision} runs the UNet in a low precision whose results depend on "
        f"the batch (sampling batches of {config.sample.batch_size} vs training minibatches of "
        f"{config.train.batch_size}); use mixed_precision=no or equal batch sizes"
        if m.mixed_precision != "no"
        else "the training step differs from the sampler (a changed scheduler, eta or guidance, non-finite "
        "weights, or non-deterministic UNet kernels)"
    )
    raise NumericalError(
        f"epoch {epoch}: re-scoring stored actions with the unchanged policy gives a mean |log ratio| of "
        f"{mean:.3g} > train.ratio_tolerance={tolerance:g} (PPO clips at train.clip_range="
        f"{config.train.clip_range:g}). Likely cause: {cause}. Raise train.ratio_tolerance to accept it."
    )


def optimizer_step(optimizer, params, named_params, loss_fault: str | None, config, accelerator):
    """Clip and step, unless the accumulated loss or gradients are non-finite on any process (then
    the gradients are dropped). Returns what was non-finite, or None when the step was taken.

    The total gradient norm (one multi-tensor operation) is finite exactly when every gradient is,
    so the tensors are searched for the culprit only when it is not. Under fp16 the grad scaler
    already skips overflowing steps (that is how it tunes its scale), so only a non-finite loss
    counts as a fault there."""
    scaled = accelerator.scaler is not None
    fault = loss_fault
    grads = [p.grad for p in params if p.grad is not None]
    if not scaled and grads and not torch.isfinite(full_tensor(torch.nn.utils.get_total_norm(grads))):
        bad = [
            n.removeprefix("module.")
            for n, p in named_params
            if p.grad is not None and not local_tensor(p.grad).isfinite().all()
        ]
        what = (
            f"non-finite gradients in {len(bad)} tensors, e.g. {bad[0]}" if bad else "gradient norm overflow"
        )
        fault = "; ".join(filter(None, [fault, what]))
    if accelerator.num_processes > 1:  # every process must take the same decision
        flags = accelerator.gather(torch.tensor([fault is not None], device=accelerator.device))
        if flags.any() and fault is None:
            fault = "non-finite values on another process"
    if fault is None or scaled:
        accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad()
    return fault
