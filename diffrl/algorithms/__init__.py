"""Training algorithms: one module per method, all behind one interface, and the registry.

An **online** algorithm module (DDPO, B²-DiffuRL, RLCM, D3PO, or a module of your own) exports:

    plan(config, epoch) -> Plan                  what this epoch samples (branch point, branches)
    prepare(ctx, rollouts, epoch) -> Batch       gathered rewards -> advantages or pairs, trained mask
    loss(term, batch, config) -> (loss, stats)   one accumulated term of the update, its 0-dim stats

and optionally ``setup(config)`` (state built before any model loads: reward statistics, saved
in every checkpoint when it has ``state_dict``/``load_state_dict``), ``collect(ctx, epoch,
sample)`` (how the epoch's rollouts are obtained; default: sample them), ``validate(config)``
(checks of the whole config, before any model loads), ``DEFAULTS`` (values for the keys a
config leaves unset), ``SECTION`` (the name of its config section, whose dataclass the module's
``Config`` is) and ``MODEL`` (``"ddim"``, ``"lcm"``, ``"flow"`` or a tuple of them: the sampler
families it trains, :func:`diffrl.transitions.family`).

A method whose loss is not on the sampler's steps (DiffusionNFT, RAFT: :mod:`diffrl.algorithms.forward`) exports
``train(ctx, batch, traj, streams, epoch, label) -> stats`` (the epoch's whole update) in place of
``loss``, and ``LOG_PROBS = False`` when it needs no step log-probs (any solver, ``eta`` 0 too).

An **offline** module (``OFFLINE = True``: Diffusion-DPO, SePPO) exports ``setup`` and
``term(ctx, learner, batch, streams) -> closure`` instead; :mod:`diffrl.offline` runs it.

The trainer (:mod:`diffrl.trainer`) only ever calls these names. ``algorithm:`` in a config is a
registered name or the import path of a module (``package.module``) that exports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from diffrl.errors import ConfigError
from diffrl.types import Trajectory

REGISTRY: dict[str, str] = {
    "ddpo": "diffrl.algorithms.ddpo",
    "b2diffurl": "diffrl.algorithms.b2diffurl",
    "rlcm": "diffrl.algorithms.rlcm",
    "d3po": "diffrl.algorithms.d3po",
    "dpo": "diffrl.algorithms.dpo",
    "seppo": "diffrl.algorithms.seppo",
    "grpo": "diffrl.algorithms.grpo",
    "nft": "diffrl.algorithms.nft",
    "raft": "diffrl.algorithms.raft",
}
"""Registered names -> modules (a line per method)."""


@dataclass(frozen=True)
class Plan:
    """What one epoch samples. Chains run their first ``branch_step`` steps once and continue in
    ``num_branches`` branches from there (:func:`diffrl.rollout.sample_branches`); training covers
    steps ``branch_step..T-1``. ``group_size`` > 1 draws each prompt once for that many
    consecutive chains (independent noise; GRPO's groups); with ``num_branches`` = ``group_size``
    a group is one trunk's branches instead (a batch then samples ``batch_size / K`` trunks).
    ``window`` = (start, stop) samples only actions start..stop−1 stochastically and the others with
    the deterministic solver (an SDE window, :func:`diffrl.rollout.step_transitions`).
    ``checkpoint`` asks for a checkpoint after the epoch whatever ``run.save_freq`` says (a run
    that waits for labels resumes from it)."""

    branch_step: int = 0
    num_branches: int = 1
    checkpoint: bool = False
    group_size: int = 1
    window: tuple[int, int] | None = None


@dataclass
class Rollouts:
    """This process's samples of one epoch, scored.

    Attributes:
        traj: every chain of the epoch, ``parents [N]`` the sibling group of each.
        rewards: ``[N]`` float32, NaN where the reward dropped a sample.
        metadata: N dicts the reward filled in (numeric values are logged as ``reward_<key>``).
        time_sampling, time_reward: seconds spent sampling and waiting for rewards.
    """

    traj: Trajectory
    rewards: torch.Tensor
    metadata: list[dict]
    time_sampling: float = 0.0
    time_reward: float = 0.0


@dataclass
class Context:
    """What an algorithm may use besides the rollouts: the config, the accelerator (to gather
    across processes), the run folder, the state its ``setup`` returned, and the learner
    (:class:`diffrl.learner.Learner`: the pipeline, the trained denoiser, its optimizer)."""

    config: object
    accelerator: object
    run_dir: object
    state: object = None
    learner: object = None


@dataclass
class Batch:
    """What ``prepare`` hands to the update: M items, each a tuple of k of this process's samples
    (k = 1 for PPO's samples, 2 for D3PO's pairs).

    Attributes:
        members: ``[M, k]`` long, sample indices of each item.
        trained: ``[M]`` bool, the items that are trained (others were dropped, not selected, ties).
        first_step: the first trained step of every chain (B²-DiffuRL's branch point).
        stop_step: one past the last trained step (None: the chain's end; an SDE window's end).
        kl_outside: the KL penalty also on the steps outside ``first_step..stop_step−1``, each a
            KL-only term (``grpo.sde_window.kl: chain``; the learner's ``train_epoch``).
        values: tensors the loss reads (``advantages [N]``, ``h [M, 2]``...).
        rewards: ``[P·N]`` every process's rewards (NaN: dropped), for the epoch's metrics.
        metrics: more numbers for the epoch's record (already summed or averaged over processes).
    """

    members: torch.Tensor
    trained: torch.Tensor
    rewards: torch.Tensor
    first_step: int = 0
    stop_step: int | None = None
    kl_outside: bool = False
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Term:
    """One accumulated term of the update: B items at one trained step each.

    Attributes:
        rows: ``[B]`` item indices into the :class:`Batch`; steps: ``[B]`` step index of each.
        valid: ``[B]`` bool, False for padding (no loss).
        log_prob: ``[B, k]`` log πθ of the members' stored actions (element mean, with gradient).
        old_log_prob: ``[B, k]`` the log-probs stored at sampling time.
        reference: ``() -> [B, k]``, log-probs under the frozen pretrained model (LoRA disabled),
            without gradient; computed only when called.
        kl: ``() -> [B, k]``, the exact KL(πθ || π_ref) of the step Gaussians at the stored states
            (element mean, :func:`diffrl.ops.gaussian_kl`), with gradient through πθ; computed only
            when called (the reference pass is shared with ``reference``).
    """

    rows: torch.Tensor
    steps: torch.Tensor
    valid: torch.Tensor
    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    reference: Callable[[], torch.Tensor]
    kl: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    """A method's interface resolved from its module, optional names filled with their defaults."""

    name: str
    module: ModuleType
    offline: bool
    models: tuple[str, ...]
    """The sampler families it trains (``ddim``, ``lcm``)."""
    section: str | None
    defaults: dict
    validate: Callable
    setup: Callable
    log_probs: bool = True
    """Whether its loss reads the sampler's step log-probs (``sample.eta`` > 0 on DDIM)."""
    plan: Callable | None = None
    collect: Callable | None = None
    prepare: Callable | None = None
    loss: Callable | None = None
    train: Callable | None = None
    term: Callable | None = None


def _sample(ctx: Context, epoch: int, sample: Callable[[], Rollouts]) -> Rollouts:
    """The default ``collect``: sample and score the epoch's rollouts."""
    return sample()


def get(name: str) -> Algorithm:
    """The algorithm registered as ``name``, or the module at import path ``name``; raises
    :class:`ConfigError` naming what is missing."""
    path = REGISTRY.get(name, name)
    try:
        module = importlib.import_module(path)
    except (ImportError, ValueError, TypeError) as err:  # also '' and relative names such as '.x'
        known = ", ".join(REGISTRY)
        raise ConfigError(
            f"algorithm: {name!r} is not a registered algorithm ({known}) nor an importable module ({err})"
        ) from err
    offline = bool(getattr(module, "OFFLINE", False))
    required = ("setup", "term") if offline else ("plan", "prepare")
    missing = [n for n in required if not callable(getattr(module, n, None))]
    if not offline and not any(callable(getattr(module, n, None)) for n in ("loss", "train")):
        missing.append("loss (or train)")
    if missing:
        raise ConfigError(f"algorithm: {name!r}: module {path} does not define {', '.join(missing)}")
    names = ("plan", "prepare", "loss", "train", "term")
    return Algorithm(
        name=name,
        module=module,
        offline=offline,
        models=_families(getattr(module, "MODEL", "ddim")),
        section=getattr(module, "SECTION", None),
        defaults=getattr(module, "DEFAULTS", {}),
        validate=getattr(module, "validate", lambda config: None),
        setup=getattr(module, "setup", lambda config: None),
        log_probs=bool(getattr(module, "LOG_PROBS", True)),
        collect=getattr(module, "collect", _sample),
        **{n: getattr(module, n, None) for n in names},
    )


def _families(model) -> tuple[str, ...]:
    """``MODEL`` as a tuple of sampler families."""
    return (model,) if isinstance(model, str) else tuple(model)


def trained_on(model: str) -> list[str]:
    """The registered online algorithms that train the ``model`` sampler family (``ddim``, ``lcm``, ``flow``)."""
    algorithms = [get(name) for name in REGISTRY]
    return [a.name for a in algorithms if not a.offline and model in a.models]


def register(name: str, module_path: str) -> None:
    """Register ``module_path`` under ``name`` (``algorithm: name`` in configs)."""
    REGISTRY[name] = module_path


# ---------------------------------------------------------------------------- shared by methods


@dataclass
class Gathered:
    """Every process's rewards, prompts and sibling groups of one epoch, in process order, and
    where this process's samples start (``start``, ``count``)."""

    rewards: torch.Tensor
    prompts: list[str]
    groups: torch.Tensor
    start: int
    count: int

    @property
    def finite(self) -> torch.Tensor:
        """``[P·N]`` bool, samples whose reward was not dropped."""
        return torch.isfinite(self.rewards)

    @property
    def kept_prompts(self) -> list[str]:
        """The prompts of the samples whose reward was not dropped, in order."""
        return [p for p, keep in zip(self.prompts, self.finite.tolist()) if keep]

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's slice of a gathered ``[P·N, ...]`` tensor."""
        return values[self.start : self.start + self.count]


def gather(ctx: Context, rollouts: Rollouts, epoch: int) -> Gathered:
    """Gather rewards, prompts and groups over processes (group ids made unique per process);
    raises :class:`~diffrl.errors.RewardError` when the reward dropped every sample."""
    from accelerate.utils import gather_object

    from diffrl.errors import RewardError

    accelerator, n = ctx.accelerator, len(rollouts.traj)
    groups = rollouts.traj.parents if rollouts.traj.parents is not None else torch.arange(n)
    rewards = accelerator.gather(rollouts.rewards.to(accelerator.device)).cpu()
    groups = accelerator.gather((groups + accelerator.process_index * n).to(accelerator.device)).cpu()
    prompts = rollouts.traj.prompts
    prompts = gather_object(list(prompts)) if accelerator.num_processes > 1 else list(prompts)
    if not torch.isfinite(rewards).any():
        raise RewardError(
            f"epoch {epoch}: the reward failed on every sample (all dropped); nothing to train on"
        )
    return Gathered(rewards, prompts, groups, accelerator.process_index * n, n)


def per_sample(
    advantages: torch.Tensor,
    trained: torch.Tensor,
    gathered: Gathered,
    first_step: int = 0,
    stop_step: int | None = None,
) -> Batch:
    """A :class:`Batch` of single samples (PPO-style methods) from gathered ``advantages [P·N]``
    and ``trained [P·N]``: this process's slice, trained on steps ``first_step..stop_step−1``."""
    local = gathered.local(trained)
    return Batch(
        members=torch.arange(local.shape[0])[:, None],
        trained=local,
        rewards=gathered.rewards,
        first_step=first_step,
        stop_step=stop_step,
        values={"advantages": gathered.local(advantages)},
    )
