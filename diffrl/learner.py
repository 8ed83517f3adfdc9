"""The learner: the trainable policy (pipeline, LoRA, AdamW under accelerate), the log-probability of
stored actions under it, and the update with its guards (non-finite steps skipped, the ratio check
before an epoch's first update). The online loop (:mod:`diffrl.trainer`) and the offline loop
(:mod:`diffrl.offline`) both train through it.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers import UNet2DConditionModel

from diffrl.algorithms import Batch, Term
from diffrl.collect import sampler_settings
from diffrl.ema import EMA
from diffrl.errors import ConfigError
from diffrl.guards import NonFiniteGuard, check_log_ratios, optimizer_step
from diffrl.ops import gaussian_kl
from diffrl.pipelines import load_pipeline
from diffrl.progress import progress
from diffrl.sharding import sharded
from diffrl.text import text_encoders
from diffrl.transitions import denoiser, transition_for
from diffrl.types import StepOutput, Text, Trajectory

MERGE_TOLERANCE = 1e-5
"""Largest mean |log ratio| at which ``sample.merge_lora: auto`` keeps sampling with merged LoRA."""

# ============================================================================ building the policy


def set_attention(unet, backend: str, device: torch.device) -> None:
    """xformers when asked (or on auto when usable), else torch scaled-dot-product attention. A
    flow transformer (SD3, FLUX) keeps its own joint-attention processors, which are torch SDPA
    (``model.attention: xformers`` is refused for it in preflight)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if not isinstance(unet, UNet2DConditionModel):
        return
    usable = device.type == "cuda" and importlib.util.find_spec("xformers") is not None
    if backend == "xformers" or (backend == "auto" and usable):
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())


def prepare_denoiser(pipe, config, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze what is not trained, attach LoRA (peft) to the denoiser (UNet or flow transformer) or
    unfreeze it; returns the trainable parameters, always float32 (master weights under mixed
    precision)."""
    m = config.model
    model = denoiser(pipe)
    frozen = [pipe.vae, *text_encoders(pipe)] + ([model] if m.use_lora else [])
    for module in frozen:
        module.requires_grad_(False)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    if m.use_lora:
        from peft import LoraConfig

        model.add_adapter(
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(m.lora_target_modules),
            )
        )
    else:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"model.lora_target_modules={m.lora_target_modules} matched no module of the {type(model).__name__}"
        )
    for p in params:
        p.data = p.data.float()
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return params


def make_optimizer(params: list, config) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``train``'s settings, updating all tensors in one multi-tensor
    call (``foreach``; torch's default only on CUDA): a LoRA has a hundred small tensors."""
    t = config.train
    return torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
        foreach=True,
    )


def build_learner(config, accelerator: Accelerator) -> Learner:
    """Load the pipeline, attach what is trained, build AdamW and let accelerate wrap the denoiser
    (LoRA lives inside the DDP module, so its gradients are all-reduced).

    Under accelerate's FSDP (``configs/accelerate/fsdp.yaml``) the pipeline loads on the CPU and
    the denoiser is sharded onto the devices as accelerate prepares it (no process ever holds the
    whole trainable model on its device); the trained parameters are then the shards (DTensors)
    that accelerate puts into the optimizer."""
    m, t = config.model, config.train
    set_seed(config.run.seed)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.mixed_precision]
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and config.sample.merge_lora is True:
        raise ConfigError(
            "sample.merge_lora: true cannot merge LoRA into FSDP-sharded weights; use auto or false"
        )
    pipe = load_pipeline(m.pretrained, revision=m.revision, device="cpu" if fsdp else accelerator.device)
    model = denoiser(pipe)
    set_attention(model, m.attention, accelerator.device)
    params = prepare_denoiser(pipe, config, weight_dtype)
    if m.compile:  # in place: the pipeline keeps the same module (LoRA saving, merging, adapters)
        model.compile()
    unet, optimizer = accelerator.prepare(model, make_optimizer(params, config))
    if fsdp:
        for part in (pipe.vae, *text_encoders(pipe)):
            part.to(accelerator.device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ema = EMA(denoiser(pipe), t.ema_decay, t.ema_every) if t.ema else None
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    return Learner(unet, pipe, optimizer, params, accelerator, guard, config, ema)


@contextmanager
def adapters_disabled(unet):
    """The denoiser without its LoRA adapters inside the block: the frozen pretrained model."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def step_log_prob(
    unet, pipe, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor, config, accelerator
):
    """log π of stored actions: for ``samples [B]`` at their step indices ``steps [B]``, the
    element-mean log-density of the next state given x_t under ``unet`` (the denoiser: the DDIM
    step, an LCM's consistency step or the flow step, guided as ``sample`` and ``train.cfg`` say);
    ``[B]`` float32 (with gradient unless called under no_grad)."""
    return step_output(unet, pipe, traj, samples, steps, config, accelerator).log_prob


def step_output(
    unet, pipe, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor, config, accelerator
) -> StepOutput:
    """The policy's step at the stored states of :func:`step_log_prob`: its Gaussian (mean
    ``[B, C, h, w]``, std) and the log-prob ``[B]`` of the stored actions."""
    text = traj.text.select(samples)
    if not config.train.cfg:
        text = Text(text.embeds, text.pooled)
    x_t, x_next, t = traj.latents[samples, steps], traj.latents[samples, steps + 1], traj.timesteps[steps]
    transition = transition_for(pipe, sampler_settings(config))
    with accelerator.autocast():
        noise_pred = transition.noise_pred(x_t, t, text, unet=unet)
    return transition.step(noise_pred, t, x_t, prev_sample=x_next)


# ============================================================================ the update


def training_items(trained: torch.Tensor, per_step: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The local items to train on, padded so that every process runs the same number of whole
    optimizer steps (DDP needs it): ``trained [M]`` bool -> (indices ``[M']``, mask ``[M']`` bool),
    M' a multiple of ``per_step``; padding repeats an item with mask False (no loss)."""
    kept = trained.nonzero().flatten()
    count = torch.tensor([kept.numel()], device=accelerator.device)
    most = int(accelerator.gather(count).max()) if accelerator.num_processes > 1 else kept.numel()
    size = max(1, -(-most // per_step)) * per_step
    pad = size - kept.numel()
    filler = kept[:1] if kept.numel() else torch.zeros(1, dtype=torch.long)
    index = torch.cat([kept, filler.repeat(pad)])
    mask = torch.cat([torch.ones(kept.numel(), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return index, mask


def process_mean(values: dict[str, float], accelerator) -> dict[str, float]:
    """Each of ``values`` averaged over the processes (every process gets the same numbers)."""
    return {
        k: accelerator.reduce(torch.tensor(float(v), device=accelerator.device), "mean").item()
        for k, v in values.items()
    }


def pass_rows(rows: torch.Tensor, cols: torch.Tensor, step_order: torch.Tensor):
    """One training pass: minibatch ``rows [B]`` at their trained steps number ``cols [k]`` (each row
    has its own step order ``step_order [M, S]``) -> (items ``[B·k]``, steps ``[B·k]``), step-major."""
    return rows.repeat(len(cols)), step_order[rows][:, cols].T.reshape(-1)


def auto_timesteps_per_pass(
    num_train_steps: int, device: torch.device, pass_bytes: int | None, free_bytes: int | None
) -> int:
    """``train.timesteps_per_pass: auto``: every trained timestep of a minibatch in one pass on the
    CPU (memory is not the limit there); on CUDA as many as 80% of the free memory holds, given
    what one timestep's pass costs (``pass_bytes``, measured), at least 1."""
    if device.type != "cuda" or not pass_bytes or free_bytes is None:
        return num_train_steps
    return max(1, min(num_train_steps, int(0.8 * free_bytes) // pass_bytes))


@dataclass
class Learner:
    """The trainable policy and what updates it: the accelerate-wrapped denoiser ``unet`` (a UNet
    or a flow transformer; ``denoiser(pipe)`` is the same weights unwrapped), the AdamW over ``params``, and the non-finite guard.

    ``ema`` is the moving average of the trained weights (``train.ema``), updated after each
    optimizer step taken. ``merge_sampling`` says whether rollouts fold LoRA into the base weights (``sample.merge_lora``;
    ``auto`` turns it off for good once the ratio check measures more than :data:`MERGE_TOLERANCE`)."""

    unet: torch.nn.Module
    pipe: object
    optimizer: torch.optim.Optimizer
    params: list
    accelerator: Accelerator
    guard: NonFiniteGuard
    config: object
    ema: EMA | None = None
    loss_fault: str | None = None
    merge_sampling: bool = False
    per_pass: int | None = None
    named_params: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.named_params = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        merge = self.config.sample.merge_lora
        self.merge_sampling = (
            self.config.model.use_lora
            and not sharded(self.unet)
            and (merge is True or (merge == "auto" and self.config.model.mixed_precision == "no"))
        )

    def log_prob(
        self, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor, unet=None
    ) -> torch.Tensor:
        """log πθ ``[B]`` of the stored actions of ``samples [B]`` at ``steps [B]`` under the
        training UNet (or ``unet``): :func:`step_log_prob`."""
        return self.step(traj, samples, steps, unet).log_prob

    def step(self, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor, unet=None) -> StepOutput:
        """The training UNet's (or ``unet``'s) step Gaussian at the stored states: :func:`step_output`."""
        unet = unet if unet is not None else self.unet
        return step_output(unet, self.pipe, traj, samples, steps, self.config, self.accelerator)

    def reference_step(self, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor) -> StepOutput:
        """:meth:`step` under the frozen pretrained model (LoRA disabled), without gradient."""
        model = denoiser(self.pipe)
        with torch.no_grad(), adapters_disabled(model):
            return self.step(traj, samples, steps, unet=model)

    def reference_log_prob(
        self, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """log-probs ``[B]`` of the stored actions under the frozen pretrained model (LoRA disabled)."""
        return self.reference_step(traj, samples, steps).log_prob

    def update(self, compute_loss, where: str, term: str) -> dict[str, float]:
        """One accumulated loss term: ``compute_loss() -> (loss, {name: 0-dim stat})`` and its
        backward inside ``accelerator.accumulate``; at an accumulation boundary, the optimizer
        step (skipped when anything was non-finite, see :func:`optimizer_step`). ``where`` (the
        epoch) and ``term`` (the minibatch and step) name the place in warnings and errors."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            loss, stats = compute_loss()
            accelerator.backward(loss)
            if not torch.isfinite(loss):
                self.loss_fault = f"loss {loss.item()} at {term}"
            if accelerator.sync_gradients:
                fault = optimizer_step(
                    self.optimizer, self.params, self.named_params, self.loss_fault, self.config, accelerator
                )
                self.guard.record(fault, where)
                if fault is None and self.ema is not None:
                    self.ema.update()
                self.loss_fault = None
        return {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}

    def check_ratios(self, log_ratio: torch.Tensor, epoch: int) -> None:
        """The epoch's ratio check (:func:`check_log_ratios`); with ``sample.merge_lora: auto``,
        merged sampling stops for good when its ratios stray more than :data:`MERGE_TOLERANCE`."""
        mean = check_log_ratios(log_ratio, self.config, self.accelerator, epoch)
        if self.merge_sampling and self.config.sample.merge_lora == "auto" and mean > MERGE_TOLERANCE:
            self.merge_sampling = False
            self.accelerator.print(
                f"epoch {epoch}: sampling with merged LoRA re-scores at a mean |log ratio| of {mean:.2g} > "
                f"{MERGE_TOLERANCE:g}; sample.merge_lora=auto samples with unmerged adapters from now on"
            )

    def timesteps_per_pass(self, num_train_steps: int, measure) -> int:
        """``train.timesteps_per_pass``, resolving ``auto`` once per run (:func:`auto_timesteps_per_pass`;
        on CUDA ``measure()`` runs one timestep's pass to learn its memory) with a log line."""
        chosen = self.config.train.timesteps_per_pass
        if chosen != "auto":
            return chosen
        if self.per_pass is None:
            device, pass_bytes, free = self.accelerator.device, None, None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start = torch.cuda.memory_allocated(device)
                measure()
                pass_bytes = torch.cuda.max_memory_allocated(device) - start
                free = torch.cuda.mem_get_info(device)[0]
            self.per_pass = auto_timesteps_per_pass(num_train_steps, device, pass_bytes, free)
            self.accelerator.print(
                f"train.timesteps_per_pass=auto: {self.per_pass} of {num_train_steps} trained timesteps per "
                f"forward/backward pass ({'from free memory' if device.type == 'cuda' else 'all: on the CPU'})"
            )
        return min(self.per_pass, num_train_steps)

    def step_order(self, span: int, trained: int, generator) -> torch.Tensor:
        """One chain's ``span`` steps, the ``trained`` ones first in random order: any of them
        (``train.timestep_selection: random``) or the first, highest-noise ones (``first``). ``[span]``."""
        if self.config.train.timestep_selection == "random":
            return torch.randperm(span, generator=generator)
        return torch.cat([torch.randperm(trained, generator=generator), torch.arange(trained, span)])

    def train_epoch(self, loss_fn, batch: Batch, traj: Trajectory, streams, epoch: int, label: str) -> dict:
        """The update of one epoch: ``num_inner_epochs`` passes over the items with ``batch.trained``
        True, shuffled, in minibatches of ``train.batch_size``; each item's steps
        ``batch.first_step..batch.stop_step-1`` (to T-1 by default) in its own random order (``timestep_fraction`` of them, chosen by
        :meth:`step_order`), k =
        ``timesteps_per_pass`` of them per forward/backward pass. Each pass is one
        :class:`~diffrl.algorithms.Term` for ``loss_fn(term, batch, config) -> (loss, stats)``,
        weighted by its share of the steps, so the accumulated gradient is that of one term per
        (minibatch, step) for any k. The first term is ratio-checked (:meth:`check_ratios`)
        before its update; ``label`` (``epoch 3/10``) heads the progress lines. With
        ``batch.kl_outside``, every step of the chain outside the trained span follows as KL-only
        terms (:meth:`kl_term`), weighted like a trained step. Returns the mean of every stat over
        the terms that report it, and ``skipped_steps``."""
        t, accelerator = self.config.train, self.accelerator
        index, valid = training_items(
            batch.trained, t.batch_size * t.gradient_accumulation_steps, accelerator
        )
        num_steps, k = traj.num_steps, batch.members.shape[1]
        stop = batch.stop_step or num_steps
        span = stop - batch.first_step
        num_train_steps = int(span * t.timestep_fraction)
        outside = (
            [s for s in range(num_steps) if not batch.first_step <= s < stop] if batch.kl_outside else []
        )
        outside_order = torch.tensor(outside, dtype=torch.long).expand(len(index), -1)
        transition_for(self.pipe, sampler_settings(self.config)).schedule(
            self.config.sample.num_steps, traj.latents[:1, 0]
        )

        def term(items: torch.Tensor, steps: torch.Tensor, ok: torch.Tensor, weight: float, check: bool):
            samples = batch.members[items].T.reshape(-1)  # member-major: [k·B]
            steps_k = steps.repeat(k)
            out = self.step(traj, samples, steps_k)
            log_prob = out.log_prob.view(k, -1).T  # [B, k]
            old = traj.log_probs[samples, steps_k].view(k, -1).T
            if check:
                self.check_ratios((log_prob - old).flatten(), epoch)
            ref = cache(lambda: self.reference_step(traj, samples, steps_k))  # one pass for both
            reference = lambda: ref().log_prob.view(k, -1).T  # noqa: E731
            kl = lambda: gaussian_kl(out.mean, out.std, ref().mean, ref().std).view(k, -1).T  # noqa: E731
            loss, stats = loss_fn(Term(items, steps, ok, log_prob, old, reference, kl), batch, self.config)
            return loss * weight, stats

        def kl_term(items: torch.Tensor, steps: torch.Tensor, ok: torch.Tensor, weight: float, _check: bool):
            samples, steps_k = batch.members[items].T.reshape(-1), steps.repeat(k)
            return self.kl_term(traj, samples, steps_k, ok.repeat(k), weight)

        def measure():
            with accelerator.no_sync(self.unet):
                loss, _ = term(index[:1], torch.full((1,), batch.first_step), valid[:1], 1.0, False)
                loss.backward()
            self.optimizer.zero_grad()

        per_pass = self.timesteps_per_pass(num_train_steps, measure)
        passes = [(term, cols) for cols in torch.arange(num_train_steps).split(per_pass)]
        if outside:
            passes += [
                (kl_term, cols) for cols in torch.arange(len(outside)).add(num_train_steps).split(per_pass)
            ]
        accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps * len(passes)
        accelerator.step = (
            0  # whole optimizer steps per epoch; the accumulation length may change between epochs
        )
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        terms, skipped_before = 0, self.guard.skipped
        self.unet.train()
        for inner in range(t.num_inner_epochs):
            order = torch.randperm(len(index), generator=streams.shuffle)
            step_order = batch.first_step + torch.stack(
                [self.step_order(span, num_train_steps, streams.shuffle) for _ in range(len(index))]
            )
            step_order = torch.cat([step_order[:, :num_train_steps], outside_order], 1)
            inner_label = f" {inner + 1}/{t.num_inner_epochs}" if t.num_inner_epochs > 1 else ""
            minibatches = progress(
                order.split(t.batch_size),
                f"{label}: training{inner_label}",
                accelerator.is_local_main_process,
                "minibatches",
            )
            for b, rows in enumerate(minibatches):
                for fn, cols in passes:
                    items, steps = pass_rows(rows, cols, step_order)
                    weight = len(cols) * len(passes) / num_train_steps
                    stats = self.update(
                        partial(fn, index[items], steps, valid[items], weight, terms == 0),
                        f"epoch {epoch}, inner epoch {inner}",
                        f"minibatch {b}, {'trained' if fn is term else 'KL-only'} timestep {int(cols[0])}"
                        + (f"..{int(cols[-1])}" if len(cols) > 1 else ""),
                    )
                    for name, value in stats.items():
                        totals[name] = totals.get(name, 0.0) + value
                        counts[name] = counts.get(name, 0) + 1
                    terms += 1
        self.unet.eval()
        return {
            **{n: v / counts[n] for n, v in totals.items()},
            "skipped_steps": self.guard.skipped - skipped_before,
        }

    def kl_term(
        self, traj: Trajectory, samples: torch.Tensor, steps: torch.Tensor, valid: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor, dict]:
        """``train.kl_beta`` × the mean exact step KL(πθ || π_ref) over the ``valid [B]`` of
        ``samples [B]`` at ``steps [B]``, steps the chain took without training them (an SDE window's
        ODE steps): the Gaussians are those of the sampler's stochastic step at the stored states
        (a deterministic one, CPS onto σ' = 0, is left out).
        Returns (the loss × ``weight``, ``{"kl_outside": the mean KL}``)."""
        out, ref = self.step(traj, samples, steps), self.reference_step(traj, samples, steps)
        stochastic = out.std.expand_as(out.mean).flatten(1)[:, 0] > 0  # CPS onto σ' = 0 has no density
        mask = (valid.to(out.mean.device) & stochastic).float()
        kl = (gaussian_kl(out.mean, out.std, ref.mean, ref.std) * mask).sum() / mask.sum().clamp(min=1.0)
        return self.config.train.kl_beta * kl * weight, {"kl_outside": kl.detach()}
