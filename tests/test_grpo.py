"""GRPO (issue #22, the DDIM policy): the exact step KL against torch.distributions, group
advantages by hand, grouped prompt draws, the trainer's KL term against an independent
computation, a run that raises a learnable reward, and the shipped tiny config raising held-out
Toy-GenEval."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffrl.algorithms import Batch
from diffrl.algorithms.grpo import group_advantages
from diffrl.cli import resolve_train_config
from diffrl.collect import epoch_prompts
from diffrl.config import load_config
from diffrl.errors import ConfigError
from diffrl.files import read_jsonl
from diffrl.learner import build_learner
from diffrl.ops import gaussian_kl
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.run import Streams
from diffrl.trainer import train
from diffrl.types import SamplerSettings

ROOT = Path(__file__).parent.parent
CONFIG = str(ROOT / "configs" / "grpo" / "tiny_geneval.yaml")


def test_gaussian_kl_is_the_exact_kl_per_element_averaged():
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    std_p = torch.rand(3, 1, 1, 1, generator=g) + 0.1
    std_q = torch.rand(3, 4, 5, 5, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, std_p.expand_as(mean_p)), torch.distributions.Normal(mean_q, std_q)
    )
    torch.testing.assert_close(gaussian_kl(mean_p, std_p, mean_q, std_q), expected.flatten(1).mean(1))
    shared = std_p  # the sampler's case: one std for both
    torch.testing.assert_close(
        gaussian_kl(mean_p, shared, mean_q, shared),
        ((mean_p - mean_q) ** 2 / (2 * shared**2)).flatten(1).mean(1),
    )
    assert gaussian_kl(mean_p, shared, mean_p, shared).abs().max() < 1e-6


def test_group_advantages_by_hand():
    prompts = ["a", "a", "a", "b", "b", "b", "c", "c"]
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, float("nan"), 5.0, 5.0])
    adv = group_advantages(prompts, rewards, global_std=False, eps=1e-4)
    std_a = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    torch.testing.assert_close(adv[:3], (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / (std_a + 1e-4))
    torch.testing.assert_close(
        adv[3:5], torch.tensor([-1.0, 1.0]) * 2 / (2 + 1e-4)
    )  # the dropped one left out
    assert adv[5] == 0 and adv[6:].tolist() == [0.0, 0.0]  # dropped; a group of equal rewards
    finite = torch.isfinite(rewards)
    glob = group_advantages(prompts, rewards, global_std=True, eps=1e-4)
    std = rewards[finite].std(unbiased=False)
    torch.testing.assert_close(glob[:3], (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / (std + 1e-4))


def test_the_epoch_draws_each_prompt_once_per_group():
    source = load_prompts([f"p{i}" for i in range(50)])
    prompts = epoch_prompts(source, 24, 8, torch.Generator().manual_seed(0))
    assert len(prompts) == 24 and all(len(set(prompts[i : i + 8])) == 1 for i in range(0, 24, 8))
    assert epoch_prompts(source, 24, 1, torch.Generator()) is None  # DDPO's per-batch draws stay as they were
    with pytest.raises(ConfigError, match=r"grpo.group_size: 5 must divide sample.batch_size"):
        load_config(CONFIG, ["grpo.group_size=5"])
    with pytest.raises(ConfigError, match=r"grpo.group_size: must be >= 2"):
        load_config(CONFIG, ["grpo.group_size=1"])
    with pytest.raises(ConfigError, match=r"train.kl_beta: 0.04 needs model.use_lora: true"):
        load_config(CONFIG, ["model.use_lora=false"])


def test_the_kl_term_is_the_kl_between_the_policy_and_the_reference_steps(tmp_path):
    config = resolve_train_config(
        CONFIG, ["sample.num_steps=3", "sample.batch_size=4", "train.batch_size=2", "grpo.group_size=2",
                 "train.gradient_accumulation_steps=1", f"run.output_dir={tmp_path}"], None,
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    learner = build_learner(config, accelerator)
    pipe = learner.pipe
    with torch.no_grad():  # a non-zero adapter, so that the policy differs from the reference
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    traj = sample_trajectories(
        pipe, ["a photo of a circle"] * 4, SamplerSettings(num_steps=3, guidance_scale=5.0, eta=1.0),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    seen = []

    def capture(term, batch, config):
        seen.append((term.rows.clone(), term.steps.clone(), term.kl().detach()))
        return term.log_prob.mean() * 0, {}

    batch = Batch(
        members=torch.arange(4)[:, None], trained=torch.ones(4, dtype=torch.bool), rewards=torch.zeros(4)
    )
    learner.train_epoch(capture, batch, traj, Streams.seeded(0, 0), 0, "test")
    assert seen
    for rows, steps, kl in seen:  # members are single chains (k = 1): sample = row
        with torch.no_grad():
            policy = learner.step(traj, rows, steps)
            reference = learner.reference_step(traj, rows, steps)
        expected = ((policy.mean - reference.mean) ** 2 / (2 * policy.std**2)).flatten(1).mean(1)
        assert expected.min() > 0
        torch.testing.assert_close(kl[:, 0], expected, rtol=1e-4, atol=1e-7)


def test_grpo_trains_a_latent_consistency_model_too(tmp_path):
    """On the shipped tiny LCM: the epoch's first term passes the ratio check (the consistency
    step's stored log-probs re-score under the training pass) and the policy leaves the reference."""
    from diffrl import algorithms

    assert "grpo" in algorithms.trained_on("lcm") and "grpo" in algorithms.trained_on("ddim")
    overrides = [
        "model.pretrained=tiny-lcm", "sample.num_steps=4", "sample.batch_size=8", "train.batch_size=4",
        "train.gradient_accumulation_steps=1", "grpo.group_size=4", "reward.name=jpeg_compressibility",
        "prompts.source=toy_train_single", "run.num_epochs=2", "run.save_freq=100", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    train(resolve_train_config(CONFIG, overrides, None))
    records = read_jsonl(tmp_path / "grpo_tiny_geneval" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["num_trained"] > 0
    assert 0 < records[0]["kl"] < records[1]["kl"], [r["kl"] for r in records]


@pytest.mark.slow
def test_grpo_raises_a_learnable_reward_and_its_kl_grows_as_the_policy_leaves(tmp_path, monkeypatch):
    """Brightness is learnable by the random tiny UNet (as DDPO's test in test_trainer.py): GRPO
    with groups of 4 must raise it under full fine-tuning (β = 0, no frozen copy); with LoRA and
    β > 0 the KL to the adapter-free reference starts near 0 and grows as the policy moves."""
    (tmp_path / "bright.py").write_text(
        "def brightness(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    common = [
        "reward.name=bright:brightness", "prompts.source=toy_train_single", "model.pretrained=tiny-sd",
        "sample.num_steps=10", "sample.batch_size=16", "train.batch_size=8", "train.gradient_accumulation_steps=1",
        "grpo.group_size=4", "run.save_freq=100", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    full = [
        "run.name=full",
        "run.num_epochs=8",
        "train.kl_beta=0",
        "model.use_lora=false",
        "train.learning_rate=1e-3",
    ]
    train(resolve_train_config(CONFIG, [*common, *full], None))
    rewards = [r["reward_mean"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.015, rewards

    lora = ["run.name=lora", "run.num_epochs=4", "train.kl_beta=0.04", "train.learning_rate=1e-2"]
    train(resolve_train_config(CONFIG, [*common, *lora], None))
    kl = [r["kl"] for r in read_jsonl(tmp_path / "lora" / "metrics.jsonl")]
    assert kl[0] < kl[-1] and kl[0] < 0.01, kl


@pytest.mark.slow
def test_the_tiny_config_raises_held_out_toy_geneval(tmp_path):
    """configs/grpo/tiny_geneval.yaml as shipped (the DDIM policy, 60 epochs of 4 groups of 8)
    raises held-out Toy-GenEval overall, scored with the 20-step deterministic DDIM (Flow-GRPO's
    denoising reduction: trained with 6 steps), 16 images per row, the same evaluation seed before
    and after. Measured on three training seeds: 0.727 → 0.760, 0.746, 0.749 (docs/grpo.md)."""
    from diffrl.evaluation import toy_geneval_heldout
    from diffrl.pipelines import load_pipeline

    def heldout(pipe) -> float:
        return toy_geneval_heldout(pipe, 5.0, num_steps=20, images_per_prompt=16, eta=0.0)["overall"]

    overrides = ["monitor.enabled=false", "run.save_freq=60", f"run.output_dir={tmp_path}"]
    base = heldout(load_pipeline("tiny"))
    after = heldout(train(resolve_train_config(CONFIG, overrides, None)))
    assert after > base + 0.015, (base, after)


def test_ddpo_and_rlcm_take_the_kl_penalty_of_the_shared_loss():
    """``train.kl_beta`` adds β times the valid items' mean KL to PPO's loss, for DDPO (and RLCM,
    whose loss it is); GRPO's loss is the same function with β = 0.04 by default."""
    from diffrl.algorithms import Term, ddpo, get, rlcm
    from diffrl.algorithms.ddpo import ppo_loss

    assert get("grpo").module.loss is ddpo.loss and rlcm.loss is ddpo.loss
    assert load_config(CONFIG, []).train.kl_beta == 0.04  # the config's value
    assert load_config(None, ["algorithm=grpo"]).train.kl_beta == 0.04  # GRPO's default
    assert load_config(None, ["algorithm=ddpo"]).train.kl_beta == 0.0
    g = torch.Generator().manual_seed(0)
    log_prob, old = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    kl = torch.rand(4, 1, generator=g)
    valid = torch.tensor([True, True, False, True])
    term = Term(torch.arange(4), torch.zeros(4, dtype=torch.long), valid, log_prob, old, None, lambda: kl)
    batch = Batch(
        members=torch.arange(4)[:, None],
        trained=torch.ones(4, dtype=torch.bool),
        rewards=torch.zeros(4),
        values={"advantages": torch.tensor([1.0, -2.0, 0.5, 3.0])},
    )
    config = load_config(None, ["algorithm=ddpo", "train.kl_beta=0.5", "train.clip_range=0.1"])
    value, stats = ddpo.loss(term, batch, config)
    ppo, _ = ppo_loss(log_prob[:, 0], old[:, 0], batch.values["advantages"], 0.1, 5.0, valid)
    expected_kl = kl[valid, 0].mean()
    torch.testing.assert_close(stats["kl"], expected_kl)
    torch.testing.assert_close(value, ppo + 0.5 * expected_kl)
    without, stats = ddpo.loss(term, batch, load_config(None, ["algorithm=ddpo", "train.clip_range=0.1"]))
    torch.testing.assert_close(without, ppo)
    assert "kl" not in stats


@pytest.mark.parametrize("selection", ["random", "first"])
def test_the_trained_steps_are_a_random_subset_or_the_highest_noise_ones(tmp_path, selection):
    """With timestep_fraction 1/2 of 6 steps each chain trains 3 distinct steps: any 3 (DDPO), or
    exactly the first 3, the highest-noise ones (Flow-GRPO, which never trains the last)."""
    config = resolve_train_config(
        CONFIG, ["sample.num_steps=6", "sample.batch_size=8", "train.batch_size=4", "grpo.group_size=2",
                 "train.gradient_accumulation_steps=1", "train.timestep_fraction=0.5",
                 f"train.timestep_selection={selection}", f"run.output_dir={tmp_path}"], None,
    )  # fmt: skip
    learner = build_learner(config, Accelerator(cpu=True))
    traj = sample_trajectories(
        learner.pipe, ["a photo of a circle"] * 8, SamplerSettings(num_steps=6, guidance_scale=5.0, eta=1.0),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    trained: dict[int, list[int]] = {}

    def capture(term, batch, config):
        for row, step in zip(term.rows.tolist(), term.steps.tolist()):
            trained.setdefault(row, []).append(step)
        return term.log_prob.mean() * 0, {}

    batch = Batch(
        members=torch.arange(8)[:, None], trained=torch.ones(8, dtype=torch.bool), rewards=torch.zeros(8)
    )
    learner.train_epoch(capture, batch, traj, Streams.seeded(0, 0), 0, "test")
    assert sorted(trained) == list(range(8)) and all(len(set(s)) == len(s) == 3 for s in trained.values())
    subsets = {tuple(sorted(s)) for s in trained.values()}
    if selection == "first":
        assert subsets == {(0, 1, 2)}
    else:
        assert len(subsets) > 1 and any(5 in s for s in subsets)


def test_each_member_reward_is_normalised_in_its_group_before_the_weighted_sum():
    """A = Σ_k w_k (r_k − mean_g) / (std_g + eps): a member with a small spread (the hard, sparse
    one) counts as much as one with a large spread, which plain normalisation of the sum drowns."""
    from diffrl.algorithms import Context, Rollouts
    from diffrl.algorithms.grpo import prepare

    class Chains(list):
        parents, prompts = None, ["a"] * 4 + ["b"] * 4

    easy = [0.0, 10.0, 20.0, 30.0, 5.0, 5.0, 15.0, 15.0]
    hard = [0.1, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]
    specs = [
        {"name": "x:easy", "label": "easy", "weight": 1.0},
        {"name": "x:hard", "label": "hard", "weight": 2.0},
    ]
    config = load_config(
        None,
        ["algorithm=grpo", "grpo.group_size=4", "reward.name=weighted", "grpo.normalize_each_reward=true"],
    )
    config.reward.kwargs = {"rewards": specs}
    metadata = [{"component_easy": e, "component_hard": h} for e, h in zip(easy, hard)]
    total = torch.tensor([e + 2 * h for e, h in zip(easy, hard)])
    ctx = Context(config, Accelerator(cpu=True), None, None)
    batch = prepare(ctx, Rollouts(Chains(range(8)), total, metadata), 0)

    def norm(values):
        v = torch.tensor(values, dtype=torch.float64)
        return (v - v.mean()) / (v.std(unbiased=False) + 1e-4)

    want = torch.cat([norm(easy[:4]) + 2 * norm(hard[:4]), norm(easy[4:]) + 2 * norm(hard[4:])])
    torch.testing.assert_close(batch.values["advantages"], want.float(), rtol=1e-5, atol=1e-5)
    plain = group_advantages(Chains.prompts, total, False, 1e-4)
    assert (want[:4].float() - plain[:4]).abs().max() > 1.0  # the hard member moves the advantages
    with pytest.raises(ConfigError, match="grpo.normalize_each_reward: normalises the members"):
        load_config(None, ["algorithm=grpo", "grpo.normalize_each_reward=true"])


def test_equal_reward_groups_are_skipped_or_trained_on_the_kl_alone():
    """``grpo.zero_advantage``: ``skip`` leaves out a group whose rewards are all equal (A = 0);
    ``kl`` trains it, and its chains' loss is then β·KL exactly (the clipped surrogate of A = 0 is 0).
    A dropped reward is never trained; ``kl`` without a KL penalty is refused naming the key."""
    from diffrl.algorithms import Context, Rollouts, Term, ddpo
    from diffrl.algorithms.grpo import prepare

    class Chains(list):
        parents, prompts = None, ["solved"] * 4 + ["open"] * 4

    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, float("nan"), 0.25])
    trained = {}
    for mode in ("skip", "kl"):
        config = load_config(None, ["algorithm=grpo", "grpo.group_size=4", f"grpo.zero_advantage={mode}"])
        ctx = Context(config, Accelerator(cpu=True), None, None)
        batch = prepare(ctx, Rollouts(Chains(range(8)), rewards, [{}] * 8), 0)
        trained[mode] = batch.trained.tolist()
        assert batch.metrics["frac_zero_advantage"] == pytest.approx(5 / 8)  # 4 equal + 1 dropped
    assert trained["skip"] == [False] * 4 + [True, True, False, True]
    assert trained["kl"] == [True] * 4 + [True, True, False, True]

    g = torch.Generator().manual_seed(1)
    log_prob, old, kl = (
        torch.randn(4, 1, generator=g),
        torch.randn(4, 1, generator=g),
        torch.rand(4, 1, generator=g),
    )
    term = Term(
        torch.arange(4),
        torch.zeros(4, dtype=torch.long),
        torch.ones(4, dtype=torch.bool),
        log_prob,
        old,
        None,
        lambda: kl,
    )
    solved = Batch(members=torch.arange(4)[:, None], trained=torch.ones(4, dtype=torch.bool), rewards=torch.ones(4),
                   values={"advantages": torch.zeros(4)})  # fmt: skip
    value, _ = ddpo.loss(term, solved, config)
    torch.testing.assert_close(value, 0.04 * kl[:, 0].mean())
    with pytest.raises(ConfigError, match="grpo.zero_advantage: kl trains equal-reward groups"):
        load_config(None, ["algorithm=grpo", "grpo.zero_advantage=kl", "train.kl_beta=0"])
