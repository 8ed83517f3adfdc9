"""The shared check of the 'a short run raises shapes_alignment' tests: evaluate a shipped model on
fixed prompts, train a config on those prompts, evaluate again with the same seeded sampler."""

from pathlib import Path

from diffrl import load_pipeline, rewards
from diffrl.cli import resolve_train_config
from diffrl.evaluation import evaluate
from diffrl.trainer import train

ROOT = Path(__file__).parent.parent
SETTINGS = dict(num_images=96, num_steps=4, guidance_scale=5.0, eta=1.0, seed=7)
"""96 images over the prompts, 4 steps (DDIM eta 1, or the LCM's), guidance 5, seed 7."""


def train_and_compare(
    model: str, config: str, prompts: list[str], tmp_path, *overrides: str, settings: dict = SETTINGS
):
    """Train ``configs/<config>`` on ``prompts`` (outputs in ``tmp_path``); returns the
    ``evaluate`` results (sampler ``settings``) of ``model`` before and of the trained pipeline
    after, and the config."""
    reward_fn = rewards.get("shapes_alignment")
    before = evaluate(load_pipeline(model), prompts, reward_fn, **settings)
    run_config = resolve_train_config(
        str(ROOT / "configs" / config),
        [
            f"run.output_dir={tmp_path}",
            "run.save_freq=100",
            f"prompts.source={prompts!r}".replace("'", '"'),
            *overrides,
        ],
        None,
    )
    after = evaluate(train(run_config), prompts, reward_fn, **settings)
    print(
        f"shapes_alignment {before['reward_mean']:.3f} ± {before['reward_stderr']:.3f}"
        f" -> {after['reward_mean']:.3f} ± {after['reward_stderr']:.3f};"
        f" attributes {before['attributes']} -> {after['attributes']}"
    )
    return before, after, run_config


def assert_raised(before: dict, after: dict) -> None:
    """The mean rose by more than either standard error."""
    margin = after["reward_mean"] - before["reward_mean"]
    assert margin > max(before["reward_stderr"], after["reward_stderr"]), (before, after)
