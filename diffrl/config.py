"""Run configuration: YAML -> typed dataclasses, dotted command-line overrides, early errors.

A config file has the sections below; every field has a one-line doc and a default from the
DDPO paper's PyTorch implementation. Override any field from the command line with
``section.field=value`` (the value is parsed as YAML: ``train.learning_rate=1e-4``,
``prompts.source=[a cat, a dog]``; YAML 1.2 scalars, so ``no`` is a string, not false). Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffrl.algorithms import d3po, dpo, rlcm
from diffrl.algorithms.b2diffurl import B2DiffuRLConfig
from diffrl.algorithms.d3po import D3POConfig
from diffrl.algorithms.dpo import DPOConfig
from diffrl.errors import ConfigError


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
    """UNet module names that get LoRA adapters."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Dtype of frozen weights and autocast; LoRA and full fine-tuning weights stay float32."""
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    """Attention backend: xformers (the gpu extra, CUDA only), torch SDPA, or auto (xformers if usable)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass to cut memory."""
    compile: bool = False
    """``torch.compile`` the UNet in place (sampling and training; the first calls of each input
    shape compile, ~35 s each for the tiny UNet on 2 CPU cores; needs a C++ compiler on CPU)."""


@dataclass
class SampleConfig:
    num_steps: int = 50
    """T, DDIM sampler steps per trajectory."""
    eta: float = 1.0
    """DDIM stochasticity; > 0 (1 = DDPM posterior) so that steps have log-probabilities."""
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
    merge_lora: bool = False
    """Fold each LoRA update into its base weight while an epoch samples (one matmul per layer
    instead of three) and restore the exact base weights for training. The sampler's log-probs then
    differ from the training pass's by float rounding, which the trainer's ratio check measures."""


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
    timesteps_per_pass: int = 1
    """Trained timesteps of a minibatch computed in one forward/backward pass (a batch of
    train.batch_size × this). The update is the same for any value (the policy does not change
    inside an accumulation window; only the float summation order differs); larger values run
    small models much faster, and cost that many times the activation memory."""
    cfg: bool = True
    """Use classifier-free guidance in the training forward pass (the policy is the guided eps)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon; assumes element-mean log-probs (DESIGN.md)."""
    max_nonfinite_steps: int = 5
    """Optimizer steps skipped for a non-finite loss or gradient in a row before the run stops."""
    ratio_tolerance: float = 1e-2
    """Largest mean |log ratio| allowed when the unchanged policy re-scores its stored actions
    (checked on each epoch's first minibatch before any update; 0 turns the check off)."""


@dataclass
class StatTrackingConfig:
    enabled: bool = True
    """Per-prompt reward normalisation (else whole-batch normalisation)."""
    buffer_size: int = 16
    """Rewards remembered per prompt."""
    min_count: int = 16
    """Below this many rewards for a prompt, use the batch's mean and std."""


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


@dataclass
class PromptsConfig:
    source: str | list[str] = "simple_animals"
    """Built-in set name, text file path, or an inline list of prompts."""


@dataclass
class RunConfig:
    name: str = "ddpo"
    """Run folder name under ``output_dir``."""
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


@dataclass
class Config:
    algorithm: Literal["ddpo", "b2diffurl", "rlcm", "d3po", "dpo", "seppo"] = "ddpo"
    """Training algorithm: DDPO, B²-DiffuRL (DDPO's loss on branch-sampled, progressively longer
    suffixes), RLCM (DDPO's loss on a latent consistency model's sampler; unset keys take
    RLCM's defaults: sample.num_steps 8, guidance_scale 8, lr 1e-4, clip_range 1e-4,
    adv_clip_max 10, max_grad_norm 5, LoRA 8/8), D3PO (per-step DPO on pairs of chains that
    share x_T; unset keys take D3PO's defaults: 20 steps, lr 3e-5), or the offline preference
    methods Diffusion-DPO (dpo) and SePPO (seppo) on the images of ``dpo.data`` (lr 2e-5,
    weight decay 1e-2)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stat_tracking: StatTrackingConfig = field(default_factory=StatTrackingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    b2diffurl: B2DiffuRLConfig = field(default_factory=B2DiffuRLConfig)
    """Schedule, branching and selection of B²-DiffuRL (used when algorithm = b2diffurl)."""
    d3po: D3POConfig = field(default_factory=D3POConfig)
    """β, clamp, group size, reference and preference source of D3PO (used when algorithm = d3po)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """β, data and SePPO's references (used when algorithm = dpo or seppo)."""


# ---------------------------------------------------------------------------- YAML 1.2 reading


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans (so
    ``mixed_precision: no`` stays the string "no") and ``1e-4`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


# ---------------------------------------------------------------------------- typed building


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        return _coerce_float(key, value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _coerce_float(key: str, value: Any) -> float:
    """Ints and numeric strings (YAML 1.1 reads ``1e-4``, without a dot, as a string) become
    floats; booleans, other strings and non-finite numbers are errors."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e308 else math.inf
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def _unknown_key(dotted: str, key: str, names: list[str], section: str) -> ConfigError:
    """The error for a key that is not a field, with the closest field name as a suggestion."""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f"; did you mean {section + close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown key {dotted!r}{hint} (valid keys of {section.rstrip('.') or 'the top level'}: {', '.join(names)})"
    )


def _build(cls, data: dict, prefix: str):
    """Instantiate dataclass ``cls`` from ``data``, recursing into nested sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, key, names, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:  # a missing section, or one left empty in the YAML file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})"
            ) from err
        _set_dotted(data, key.strip(), value)
    return data


# ---------------------------------------------------------------------------- value checks


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: Config) -> Config:
    """Range and consistency checks that need no model; raises :class:`ConfigError`."""
    s, t, st, r = config.sample, config.train, config.stat_tracking, config.run
    for key, value in [
        ("train.learning_rate", t.learning_rate),
        ("train.adam_epsilon", t.adam_epsilon),
        ("train.max_grad_norm", t.max_grad_norm),
        ("train.adv_clip_max", t.adv_clip_max),
        ("train.clip_range", t.clip_range),
    ]:
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(
        s.eta > 0 or config.algorithm in ("rlcm", "dpo", "seppo"),
        "sample.eta",
        f"must be > 0 for {config.algorithm}, which trains on step log-probabilities; eta={s.eta} makes "
        "the DDIM step deterministic (no density)",
    )
    _require(t.ratio_tolerance >= 0, "train.ratio_tolerance", f"must be >= 0, got {t.ratio_tolerance}")
    _require(
        config.reward.timeout is None or config.reward.timeout > 0,
        "reward.timeout",
        f"must be > 0 seconds or null, got {config.reward.timeout}",
    )
    _require(t.adam_weight_decay >= 0, "train.adam_weight_decay", f"must be >= 0, got {t.adam_weight_decay}")
    for key, value in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)]:
        _require(0 <= value < 1, key, f"must be in [0, 1), got {value}")
    _require(
        t.timesteps_per_pass >= 1, "train.timesteps_per_pass", f"must be >= 1, got {t.timesteps_per_pass}"
    )
    _require(
        0 < t.timestep_fraction <= 1,
        "train.timestep_fraction",
        f"must be in (0, 1], got {t.timestep_fraction}",
    )
    for key, value in [
        ("sample.num_steps", s.num_steps),
        ("sample.batch_size", s.batch_size),
        ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
        ("train.batch_size", t.batch_size),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train.num_inner_epochs", t.num_inner_epochs),
        ("stat_tracking.buffer_size", st.buffer_size),
        ("stat_tracking.min_count", st.min_count),
        ("run.num_epochs", r.num_epochs),
        ("run.save_freq", r.save_freq),
        ("run.keep_last", r.keep_last),
        ("model.lora_rank", config.model.lora_rank),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
    ]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(
        s.num_steps <= 1000, "sample.num_steps", f"must be <= 1000 (training timesteps), got {s.num_steps}"
    )
    actions = s.num_steps - 1 if config.algorithm == "rlcm" else s.num_steps
    _require(
        config.algorithm != "rlcm" or s.num_steps >= 2,
        "sample.num_steps",
        f"RLCM needs H >= 2 consistency steps (H - 1 of them are trained actions), got {s.num_steps}",
    )
    _require(
        int(actions * t.timestep_fraction) >= 1,
        "train.timestep_fraction",
        f"trains int({actions} * {t.timestep_fraction}) = 0 timesteps",
    )
    if config.algorithm == "b2diffurl":
        _validate_b2diffurl(config)
        return config
    if config.algorithm == "d3po":
        _validate_d3po(config)
        return config
    if config.algorithm in ("dpo", "seppo"):
        _validate_dpo(config)
        return config
    samples = s.batch_size * s.num_batches_per_epoch
    per_step = t.batch_size * t.gradient_accumulation_steps
    _require(
        samples % per_step == 0,
        "train.batch_size",
        f"sample.batch_size * sample.num_batches_per_epoch = {samples} samples per process must be a multiple "
        f"of train.batch_size * train.gradient_accumulation_steps = {per_step} (whole optimizer steps per epoch)",
    )
    _require(
        s.resolution is None or s.resolution > 0, "sample.resolution", f"must be > 0, got {s.resolution}"
    )
    return config


def _validate_b2diffurl(config: Config) -> None:
    """B²-DiffuRL's schedule must fit in the sampler's steps. (Its selection keeps a varying number
    of samples, padded to whole optimizer steps, so batch sizes need not divide.)"""
    b, n = config.b2diffurl, config.sample.num_steps
    _require(
        1 <= b.min_trained_steps <= b.max_trained_steps <= n,
        "b2diffurl.min_trained_steps",
        f"need 1 <= min_trained_steps ({b.min_trained_steps}) <= max_trained_steps ({b.max_trained_steps}) "
        f"<= sample.num_steps ({n})",
    )
    for key, value in [("b2diffurl.num_stages", b.num_stages), ("b2diffurl.num_branches", b.num_branches)]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(b.history_stages >= 0, "b2diffurl.history_stages", f"must be >= 0, got {b.history_stages}")
    _require(b.select_threshold >= 0, "b2diffurl.select_threshold", f"must be >= 0, got {b.select_threshold}")


def _validate_d3po(config: Config) -> None:
    """D3PO's settings. (Ties are not trained, so the number of pairs varies and is padded to whole
    optimizer steps: batch sizes need not divide.)"""
    d = config.d3po
    _require(d.beta > 0, "d3po.beta", f"must be > 0, got {d.beta}")
    _require(d.clamp is None or 0 < d.clamp < 1, "d3po.clamp", f"must be in (0, 1) or null, got {d.clamp}")
    _require(d.group_size >= 2, "d3po.group_size", f"must be >= 2 (a pair per prompt), got {d.group_size}")
    _require(
        d.preferences == "reward" or not d.extra_rewards,
        "d3po.extra_rewards",
        "only used with preferences: reward (with human labels the rewards are only logged)",
    )
    _require(
        d.reference != "pretrained" or config.model.use_lora,
        "d3po.reference",
        "pretrained needs model.use_lora: true (the reference is the UNet with its LoRA adapters "
        "disabled; full fine-tuning would need a second UNet); or use reference: sampler",
    )


def _validate_dpo(config: Config) -> None:
    """Diffusion-DPO's and SePPO's settings (their epochs are passes over ``dpo.data``)."""
    d = config.dpo
    _require(
        bool(d.data),
        "dpo.data",
        "is required: a JSONL of {prompt, winner, loser}, a folder with pairs.jsonl, or hf:NAME",
    )
    _require(d.beta > 0, "dpo.beta", f"must be > 0, got {d.beta}")
    _require(
        0 <= d.empty_prompt_fraction < 1,
        "dpo.empty_prompt_fraction",
        f"must be in [0, 1), got {d.empty_prompt_fraction}",
    )
    _require(d.reference_pool >= 1, "dpo.reference_pool", f"must be >= 1, got {d.reference_pool}")
    _require(
        d.steps_per_epoch is None or d.steps_per_epoch >= 1,
        "dpo.steps_per_epoch",
        f"must be >= 1 or null, got {d.steps_per_epoch}",
    )
    _require(d.sample_steps >= 1, "dpo.sample_steps", f"must be >= 1, got {d.sample_steps}")
    _require(
        config.model.use_lora,
        "model.use_lora",
        f"{config.algorithm} needs LoRA: the reference is the UNet with its adapters disabled (or a "
        "checkpoint's adapters swapped in); full fine-tuning would need a second UNet",
    )


# ---------------------------------------------------------------------------- entry points


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None), apply overrides, check everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: no such file")
        try:
            data = _load_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"config file {path}{where}: invalid YAML ({getattr(err, 'problem', err)})"
            ) from err
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping of sections, got {type(data).__name__}"
            )
    data = apply_overrides(data, list(overrides))
    defaults = {"rlcm": rlcm.DEFAULTS, "d3po": d3po.DEFAULTS, "dpo": dpo.DEFAULTS, "seppo": dpo.DEFAULTS}.get(
        data.get("algorithm")
    )
    if defaults:
        data = _with_defaults(data, defaults)
    return validate(_build(Config, data, ""))


def _with_defaults(data: dict, defaults: dict[str, dict]) -> dict:
    """``data`` with ``defaults`` (section -> key -> value) filled in where a key is unset."""
    merged = dict(data)
    for section, values in defaults.items():
        given = merged.get(section)
        if given is None:
            given = {}
        if isinstance(given, dict):  # a non-mapping section is reported by _build
            merged[section] = {**values, **given}
    return merged


def to_dict(config: Config) -> dict:
    """The config as plain data (for YAML dumps and trackers)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
