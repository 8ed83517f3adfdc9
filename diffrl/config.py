"""Run configuration: YAML -> typed dataclasses, dotted command-line overrides, early errors.

A config file has the sections below; every field has a one-line doc and a default from the
DDPO paper's PyTorch implementation. Override any field from the command line with
``section.field=value`` (the value is parsed as YAML: ``train.learning_rate=1e-4``,
``prompts.source=[a cat, a dog]``; YAML 1.2 scalars, so ``no`` is a string, not false). Unknown
keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key, before any
model is loaded. Each section checks its own fields (its ``validate``, beside them); checks
across sections are the algorithm's (``validate`` in its module).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffrl import algorithms
from diffrl.algorithms.b2diffurl import B2DiffuRLConfig
from diffrl.algorithms.d3po import D3POConfig
from diffrl.algorithms.dpo import DPOConfig
from diffrl.algorithms.grpo import GRPOConfig
from diffrl.algorithms.nft import NFTConfig
from diffrl.algorithms.raft import RAFTConfig
from diffrl.configfile import annotated_yaml, apply_overrides, build, leaf_keys, read_yaml_file, with_defaults
from diffrl.errors import ConfigError, require


@dataclass
class ModelConfig:
    pretrained: str = "runwayml/stable-diffusion-v1-5"
    """Built-in name (tiny-sd), local diffusers folder or hub id."""
    revision: str | None = None
    """Hub revision of ``pretrained``."""
    use_lora: bool = True
    """Train LoRA adapters on the UNet (else full fine-tuning with float32 master weights)."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA alpha (scale = alpha / rank)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Denoiser module names (UNet, or SD3/FLUX transformer) that get LoRA adapters."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Dtype of frozen weights and autocast; LoRA and full fine-tuning weights stay float32."""
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    """Attention backend: xformers (the gpu extra, CUDA only), torch SDPA, or auto (xformers if usable)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass to cut memory."""
    compile: bool = False
    """``torch.compile`` the UNet in place (sampling and training; the first calls of each input
    shape compile, ~35 s each for the tiny UNet on 2 CPU cores; needs a C++ compiler on CPU)."""

    def validate(self) -> None:
        require(1 <= self.lora_rank <= 4096, "model.lora_rank", f"must be in [1, 4096], got {self.lora_rank}")
        require(self.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(bool(self.lora_target_modules), "model.lora_target_modules", "must name at least one module")


@dataclass
class SampleConfig:
    num_steps: int = 50
    """T, DDIM sampler steps per trajectory."""
    eta: float = 1.0
    """DDIM stochasticity, > 0 (1 = DDPM posterior) so that steps have log-probabilities; for a flow
    model (SD3, FLUX) the noise level a of its SDE/CPS step (Flow-GRPO: 0.7, FLUX 0.9)."""
    flow_step: Literal["sde", "cps"] = "sde"
    """A flow model's stochastic step: the Flow-GRPO SDE, or coefficients-preserving sampling."""
    max_sequence_length: int | None = None
    """T5 tokens per prompt for SD3/FLUX (default: the pipeline's, 256 for SD3, 512 for FLUX)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w."""
    batch_size: int = 8
    """Images per sampling batch, per process."""
    num_batches_per_epoch: int = 4
    """Sampling batches per epoch, per process."""
    resolution: int | None = None
    """Image side in pixels (default: the model's native size)."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of guidance."""
    merge_lora: bool | Literal["auto"] = "auto"
    """Fold each LoRA update into its base weight while an epoch samples (one matmul per layer
    instead of three) and restore the exact base weights for training. The sampler's log-probs then
    differ from the training pass's by float rounding, which the epoch's ratio check measures;
    auto: merged in float32 until a check measures a mean |log ratio| above 1e-5."""

    def validate(self) -> None:
        for key in ("num_steps", "batch_size", "num_batches_per_epoch"):
            require(getattr(self, key) >= 1, f"sample.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(
            self.num_steps <= 1000,
            "sample.num_steps",
            f"must be <= 1000 (training timesteps), got {self.num_steps}",
        )
        require(
            self.resolution is None or 0 < self.resolution <= 8192,
            "sample.resolution",
            f"must be in [1, 8192] pixels, got {self.resolution}",
        )
        require(0 <= self.eta <= 1, "sample.eta", f"must be in [0, 1] (1 = DDPM posterior), got {self.eta}")
        require(
            self.max_sequence_length is None or 1 <= self.max_sequence_length <= 4096,
            "sample.max_sequence_length",
            f"must be in [1, 4096] tokens, got {self.max_sequence_length}",
        )
        require(
            0 <= self.guidance_scale <= 100,
            "sample.guidance_scale",
            f"must be in [0, 100], got {self.guidance_scale}",
        )


@dataclass
class TrainConfig:
    learning_rate: float = 3e-4
    """Adam learning rate (constant)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """Adam epsilon."""
    batch_size: int = 4
    """Trajectories per training minibatch, per process."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (each also accumulates over its trained timesteps)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's T steps trained, in (0, 1]."""
    timestep_selection: Literal["random", "first"] = "random"
    """Which ``int(T · timestep_fraction)`` steps of a chain are trained: a random subset per chain
    (DDPO), or the first ones — the highest-noise steps, where the layout is decided (Flow-GRPO
    trains its first 9 of 10 and never the step onto σ = 0, whose noise changes no pixel but whose
    log-prob gradient is the largest of the chain)."""
    timesteps_per_pass: int | Literal["auto"] = "auto"
    """Trained timesteps of a minibatch computed in one forward/backward pass (a batch of
    train.batch_size × this). The update is the same for any value (the policy does not change
    inside an accumulation window; only the float summation order differs); larger values run
    small models much faster, and cost that many times the activation memory. auto: all of them
    on the CPU, on CUDA as many as the free memory holds (logged)."""
    cfg: bool = True
    """Use classifier-free guidance in the training forward pass (the policy is the guided eps)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon; assumes element-mean log-probs (DESIGN.md)."""
    kl_beta: float = 0.0
    """β of the exact step-KL penalty to the LoRA-disabled reference, added to PPO's loss on every
    trained step (DDPO, RLCM, GRPO: default 0.04 there; Flow-GRPO's code-β times |Δ|, see
    :mod:`diffrl.algorithms.grpo`); 0 turns it off. Needs ``model.use_lora``."""
    ema: bool = False
    """Keep an exponential moving average of the trained weights (:mod:`diffrl.ema`); the grids after
    training, the exported weights and the returned pipeline hold it (Flow-GRPO evaluates it)."""
    ema_decay: float = 0.9
    """The average's weight on its old value once warmed up: d_n = min((1 + n) / (10 + n), ema_decay)."""
    ema_every: int = 8
    """Optimizer steps between updates of the average."""
    max_nonfinite_steps: int = 5
    """Optimizer steps skipped for a non-finite loss or gradient in a row before the run stops."""
    ratio_tolerance: float = 1e-2
    """Largest mean |log ratio| allowed when the unchanged policy re-scores its stored actions
    (checked on each epoch's first minibatch before any update; 0 turns the check off)."""

    def validate(self) -> None:
        require(self.kl_beta >= 0, "train.kl_beta", f"must be >= 0, got {self.kl_beta}")
        require(0 <= self.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.ema_every >= 1, "train.ema_every", f"must be >= 1, got {self.ema_every}")
        for key in ("learning_rate", "adam_epsilon", "max_grad_norm", "adv_clip_max", "clip_range"):
            require(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        require(self.learning_rate <= 1, "train.learning_rate", f"must be <= 1, got {self.learning_rate}")
        for key in ("ratio_tolerance", "adam_weight_decay"):
            require(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2"):
            require(
                0 <= getattr(self, key) < 1, f"train.{key}", f"must be in [0, 1), got {getattr(self, key)}"
            )
        require(
            self.timesteps_per_pass == "auto" or self.timesteps_per_pass >= 1,
            "train.timesteps_per_pass",
            f"must be >= 1 or auto, got {self.timesteps_per_pass}",
        )
        require(
            0 < self.timestep_fraction <= 1,
            "train.timestep_fraction",
            f"must be in (0, 1], got {self.timestep_fraction}",
        )
        for key in ("batch_size", "gradient_accumulation_steps", "num_inner_epochs", "max_nonfinite_steps"):
            require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass
class StatTrackingConfig:
    enabled: bool = True
    """Per-prompt reward normalisation (else whole-batch normalisation)."""
    buffer_size: int = 16
    """Rewards remembered per prompt."""
    min_count: int = 16
    """Below this many rewards for a prompt, use the batch's mean and std."""

    def validate(self) -> None:
        for key in ("buffer_size", "min_count"):
            require(
                getattr(self, key) >= 1, f"stat_tracking.{key}", f"must be >= 1, got {getattr(self, key)}"
            )


@dataclass
class RewardConfig:
    name: str = "jpeg_compressibility"
    """Built-in reward name or ``package.module:function``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward factory."""
    timeout: float | None = None
    """Seconds one reward call may take before it counts as failed (None: no limit)."""
    on_error: Literal["fail", "drop"] = "fail"
    """On a reward that raises, times out or returns bad values: stop the run (fail), or drop
    the affected samples from the epoch (drop: they get no advantage and no reward statistics)."""

    def validate(self) -> None:
        require(
            self.timeout is None or self.timeout > 0,
            "reward.timeout",
            f"must be > 0 seconds or null, got {self.timeout}",
        )


@dataclass
class EvalConfig:
    """Evaluation rewards a run reports but does not optimise: at epoch 0, every ``eval.every``
    epochs and after the last, the trained weights (their average with ``train.ema``) sample ``num_images``
    images of ``prompts`` from the fixed ``seed``, logged as ``eval_<label>`` per reward; and a
    GenEval ``suite``, scored as ``diffrl eval --suite`` scores it."""

    rewards: list[dict] = field(default_factory=list)
    """``{name, kwargs?, label?}`` each: a registered reward or ``package.module:function``."""
    prompts: str | list[str] | None = None
    """Prompt source of the evaluation (default: the training prompts), cycled in order."""
    every: int = 10
    num_images: int = 32
    seed: int = 0
    num_steps: int | None = None
    """Sampler steps (default ``sample.num_steps``)."""
    eta: float | None = None
    """Sampler noise (default ``sample.eta``; 0 is the deterministic DDIM / ODE sampler)."""
    suite: str | None = None
    """A GenEval suite (``toy-geneval`` or a GenEval ``.jsonl`` file) scored at every evaluation with
    ``seed``, ``num_steps`` and ``eta``: the numbers ``diffrl eval RUN --suite … --images-per-prompt
    … --num-steps … --eta …`` prints for the same weights, logged as ``eval_geneval`` (Overall,
    which the hacking monitor watches) and ``geneval_<task>`` (each task's accuracy); sampled 32
    images at a time, as ``diffrl eval`` samples them."""
    images_per_prompt: int = 4
    """Images per suite row (GenEval: 4)."""
    detector: Literal["toy", "owlv2"] = "toy"
    """The suite's detector (``diffrl eval --detector``)."""

    def validate(self) -> None:
        for key in ("every", "num_images", "images_per_prompt"):
            require(getattr(self, key) >= 1, f"eval.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(
            self.num_steps is None or self.num_steps >= 1,
            "eval.num_steps",
            f"must be >= 1, got {self.num_steps}",
        )
        require(self.eta is None or self.eta >= 0, "eval.eta", f"must be >= 0, got {self.eta}")
        labels = []
        for i, spec in enumerate(self.rewards):
            require(
                isinstance(spec, dict) and "name" in spec and not set(spec) - {"name", "kwargs", "label"},
                f"eval.rewards[{i}]",
                f"expected {{name, kwargs, label}}, got {spec!r}",
            )
            labels.append(spec.get("label", spec["name"]))
        require(len(set(labels)) == len(labels), "eval.rewards", f"labels {labels} repeat; give each a label")


@dataclass
class MonitorConfig:
    """The reward-hacking monitor (:mod:`diffrl.monitor`): image statistics logged every epoch as
    ``image_<statistic>``, and ``hacking: 1`` (with ``hacking_reasons``) on flagged epochs."""

    enabled: bool = True
    baseline_epochs: int = 3
    """Epochs whose mean is the baseline (the first ones of the run)."""
    window: int = 3
    """Epochs averaged for the current values."""
    reward_rise: float = 0.5
    """A rise of the reward above the baseline, in baseline reward standard deviations, that counts."""
    tolerance: float = 0.1
    """How far a statistic (each in [0, 1]) may move from its baseline while the reward rises; an
    evaluation reward (``eval_<label>``) may fall this fraction of its first value."""
    stop: bool = False
    """End the run (after a checkpoint) at the first flagged epoch."""

    def validate(self) -> None:
        for key in ("baseline_epochs", "window"):
            require(getattr(self, key) >= 1, f"monitor.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("reward_rise", "tolerance"):
            require(getattr(self, key) >= 0, f"monitor.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass
class PromptsConfig:
    source: str | list[str] = "simple_animals"
    """Built-in set name, text file path, or an inline list of prompts."""
    balance: Literal["none", "task"] = "none"
    """How training prompts are drawn: ``none``, uniformly over the prompts; ``task``, a GenEval task
    uniformly, then one of its prompts (GenEval's overall score is the tasks' mean, so each task
    gets an equal share of the updates however many prompts it has). ``task`` needs a source whose
    prompts carry tasks: a GenEval ``.jsonl`` file or ``toy_{train,heldout}_geneval``."""
    tasks: list[str] | None = None
    """Train on these GenEval tasks of the source only (its rows whose ``tag`` is one of them, e.g.
    ``[colors, color_attr]``); null, every prompt. Needs a source whose prompts carry tasks, as
    ``balance: task`` does."""


@dataclass
class RunConfig:
    name: str = "ddpo"
    """Run folder name under ``output_dir``: one folder name (no path separators, no ``..``, at
    most 128 characters). A folder that already holds a run is continued only with ``--resume``."""
    overwrite: bool = False
    """Start a new run in ``run.name`` even when the folder holds one: the old run folder is deleted
    first (without this, such a run is refused; ``diffrl train --new-name`` picks a free name)."""
    output_dir: str = "runs"
    """Folder that holds run folders."""
    seed: int = 42
    """Seed of every random stream (process p uses seed + p for sampling)."""
    num_epochs: int = 100
    """Epochs to train (sampling + training each)."""
    save_freq: int = 1
    """Checkpoint every this many epochs (and after the last)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted."""
    resume_from: str | None = None
    """Checkpoint folder, or run folder (its latest checkpoint), to continue from."""
    log_with: Literal["none", "tensorboard", "wandb"] = "none"
    """Extra metrics tracker besides metrics.jsonl."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-reproducible runs and resumes (slower on GPU)."""

    def validate(self) -> None:
        for key in ("num_epochs", "save_freq", "keep_last"):
            require(getattr(self, key) >= 1, f"run.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(0 <= self.seed < MAX_SEED, "run.seed", f"must be in [0, 2**32), got {self.seed}")
        check_folder_name(self.name, "run.name")
        require(bool(self.output_dir), "run.output_dir", "must be a folder path, got ''")


MAX_SEED = 2**32
"""Seeds are below this: ``accelerate.utils.set_seed`` also seeds NumPy, which takes 32-bit seeds."""
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,127}$")


def check_folder_name(name: str, key: str) -> None:
    """``name`` must be one plain folder name: letters, digits and ``._+=@,-``, not starting with a
    dot (so no ``..``, separators or hidden folders), at most 128 characters."""
    require(
        bool(_FOLDER_NAME.match(name)),
        key,
        f"{name!r} is not a single folder name (letters, digits, ._+=@,- ; not starting with '.'; "
        "at most 128 characters)",
    )


@dataclass
class Config:
    algorithm: str = "ddpo"
    """Training algorithm, a registered name (:data:`diffrl.algorithms.REGISTRY`) or the import path
    of a module with the algorithm interface: DDPO, B²-DiffuRL (DDPO's loss on branch-sampled, progressively longer
    suffixes), RLCM (DDPO's loss on a latent consistency model's sampler; unset keys take
    RLCM's defaults: sample.num_steps 8, guidance_scale 8, lr 1e-4, clip_range 1e-4,
    adv_clip_max 10, max_grad_norm 5, LoRA 8/8), D3PO (per-step DPO on pairs of chains that
    share x_T; unset keys take D3PO's defaults: 20 steps, lr 3e-5), or the offline preference
    methods Diffusion-DPO (dpo) and SePPO (seppo) on the images of ``dpo.data`` (lr 2e-5,
    weight decay 1e-2), or GRPO (grpo: groups of chains per prompt, group-relative advantages,
    PPO's clip and an exact KL penalty to the pretrained model; section ``grpo``), or DiffusionNFT
    (nft: the forward-process loss on the old policy's images; any solver, the ODE by default)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stat_tracking: StatTrackingConfig = field(default_factory=StatTrackingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    b2diffurl: B2DiffuRLConfig = field(default_factory=B2DiffuRLConfig)
    """Schedule, branching and selection of B²-DiffuRL (used when algorithm = b2diffurl)."""
    d3po: D3POConfig = field(default_factory=D3POConfig)
    """β, clamp, group size, reference and preference source of D3PO (used when algorithm = d3po)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """β, data and SePPO's references (used when algorithm = dpo or seppo)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Group size, std and KL coefficient of GRPO (used when algorithm = grpo)."""
    nft: NFTConfig = field(default_factory=NFTConfig)
    """Group size, β, reference weight and old-policy schedule of DiffusionNFT (algorithm = nft)."""
    raft: RAFTConfig = field(default_factory=RAFTConfig)
    """Samples per prompt, acceptance and the original-data mixture of RAFT (algorithm = raft)."""


# ---------------------------------------------------------------------------- checks and entry points


def validate(config: Config) -> Config:
    """Every section's own checks, then the checks across sections: the sampler the algorithm
    trains on, and the algorithm's own (its module's ``validate``); raises :class:`ConfigError`."""
    algorithm = algorithms.get(config.algorithm)
    sections = [
        config.model,
        config.sample,
        config.train,
        config.stat_tracking,
        config.reward,
        config.run,
        config.eval,
        config.monitor,
    ]
    if algorithm.section:
        sections.append(getattr(config, algorithm.section))
    for section in sections:
        section.validate()
    s, t = config.sample, config.train
    require(
        s.eta > 0 or algorithm.offline or not algorithm.log_probs or "ddim" not in algorithm.models,
        "sample.eta",
        f"must be > 0 for {config.algorithm}, which trains on step log-probabilities; eta={s.eta} makes "
        "the DDIM step deterministic (no density)",
    )
    algorithm.validate(config)
    actions = s.num_steps - 1 if "lcm" in algorithm.models else s.num_steps  # an LCM's last step is no action
    require(
        int(actions * t.timestep_fraction) >= 1,
        "train.timestep_fraction",
        f"trains int({actions} * {t.timestep_fraction}) = 0 timesteps",
    )
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None), apply overrides, fill the
    algorithm's defaults where keys are unset, check everything. The result's ``sources`` says
    where each set value came from."""
    data = read_yaml_file(Path(path)) if path is not None else {}
    sources = dict.fromkeys(leaf_keys(data), "file")
    data = apply_overrides(data, list(overrides))
    sources.update(dict.fromkeys(leaf_keys(data) - set(sources), "override"))
    sources.update(dict.fromkeys(_override_keys(overrides), "override"))
    name = data.get("algorithm", "ddpo")
    if not isinstance(name, str):
        raise ConfigError(f"algorithm: expected a name or module path, got {name!r}")
    defaults = algorithms.get(name).defaults
    if defaults:
        filled = with_defaults(data, defaults)
        sources.update(dict.fromkeys(leaf_keys(filled) - leaf_keys(data), "algorithm defaults"))
        data = filled
    config = build(Config, data)
    config.sources = sources  # not a field: it is not part of the config file
    return validate(config)


def _override_keys(overrides) -> set[str]:
    return {item.partition("=")[0].strip() for item in overrides}


def to_dict(config: Config) -> dict:
    """The config as plain data (for YAML dumps and trackers)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def annotated(config: Config) -> str:
    """``--print-config``: the resolved config as YAML, each value followed by where it came from
    (``file``, ``override``, ``algorithm defaults`` or ``default``)."""
    return "\n".join(annotated_yaml(to_dict(config), getattr(config, "sources", {}))) + "\n"
