"""SVDD and its baselines: plain sampling at M = 1, the selection rule, finite weights, the UNet
call budget, the SVDD-MC value net, and SVDD-PM raising a verifier's score on the tiny model."""

from pathlib import Path

import pytest
import torch

from diffrl import rewards
from diffrl.guidance.svdd import (
    best_of_n,
    posterior_mean_value,
    resample_worst,
    select_candidates,
    smc,
    svdd,
)
from diffrl.guidance.value import (
    load_value_net,
    save_value_net,
    train_value_net,
    value_net_value,
    value_targets,
)
from diffrl.pipelines import load_pipeline
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.types import SamplerSettings

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle"]


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def test_one_candidate_is_plain_sampling(tiny_sd):
    plain = sample_trajectories(
        tiny_sd, PROMPTS, SamplerSettings(num_steps=5), generator=torch.Generator().manual_seed(4)
    )
    called = []

    def value(*args):
        called.append(1)
        return torch.zeros(args[1].shape[0])

    guided = svdd(
        tiny_sd,
        PROMPTS,
        value,
        SamplerSettings(num_steps=5, guidance_scale=5.0),
        num_candidates=1,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(guided.images, plain.images, rtol=0, atol=1e-6)
    assert not called, "with one candidate there is nothing to choose"


def test_alpha_zero_is_argmax_and_alpha_gives_softmax_frequencies():
    values = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 1.9]])
    assert select_candidates(values, 0.0, None).tolist() == [1, 0]
    assert select_candidates(values, 1e-6, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    row = torch.tensor([[0.0, 0.5, 1.0]]).expand(20000, 3)
    picks = select_candidates(row, 0.5, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(picks, minlength=3).float() / 20000
    torch.testing.assert_close(
        frequencies, torch.softmax(torch.tensor([0.0, 0.5, 1.0]) / 0.5, 0), atol=0.015, rtol=0
    )


def test_weights_stay_finite_for_rewards_in_the_thousands():
    values = torch.tensor([[1000.0, 3000.0, 2999.0], [-5000.0, -4000.0, -4500.0]])
    picks = select_candidates(values, 0.01, torch.Generator().manual_seed(0))
    assert picks.tolist() == [1, 1]
    source = resample_worst(torch.tensor([1e4, -1e4, 5e3]), ["p", "p", "p"], 0.3, 0.01, torch.Generator())
    assert source.tolist() == [0, 0, 2]  # the worst particle takes a copy of the best


def _count_rows(pipe):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_svdd_pm_calls_the_unet_once_per_candidate(tiny_sd):
    rows, handle = _count_rows(tiny_sd)
    try:
        p, m, t = 3, 4, 5
        out = svdd(
            tiny_sd,
            PROMPTS,
            posterior_mean_value(_checked_brightness()),
            SamplerSettings(num_steps=t, guidance_scale=5.0),
            num_candidates=m,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    budget = p + p * m * (t - 1)  # about M*T per image, not (M+1)*T
    assert out.unet_calls == budget and sum(rows) == 2 * budget  # guidance doubles the rows of each call
    assert out.images.shape == (3, 3, 32, 32)


def _checked_brightness():
    def reward(images, prompts, metadata):
        return rewards.check_rewards("brightness", brightness(images, prompts, metadata), images.shape[0])

    return reward


def test_smc_and_best_of_n_spend_the_matched_budget(tiny_sd):
    for run in (
        lambda: smc(
            tiny_sd,
            PROMPTS,
            posterior_mean_value(brightness),
            SamplerSettings(num_steps=5, guidance_scale=5.0),
            num_particles=4,
            alpha=0.1,
            generator=torch.Generator().manual_seed(0),
        ),
        lambda: best_of_n(
            tiny_sd,
            PROMPTS,
            brightness,
            SamplerSettings(num_steps=5, guidance_scale=5.0),
            n=4,
            generator=torch.Generator().manual_seed(0),
        ),
    ):
        rows, handle = _count_rows(tiny_sd)
        try:
            out = run()
        finally:
            handle.remove()
        assert out.unet_calls == 3 * 4 * 5 and sum(rows) == 2 * out.unet_calls
        assert out.images.shape == (3, 3, 32, 32)


def test_guidance_raises_a_reward_it_is_given(tiny_sd):
    """Brightness is a smooth function of the latents: every guided sampler beats plain sampling."""
    prompts = [f"a red circle {i}" for i in range(6)]
    plain = sample_trajectories(
        tiny_sd, prompts, SamplerSettings(num_steps=5), generator=torch.Generator().manual_seed(0)
    ).images
    settings, generator = SamplerSettings(num_steps=5, guidance_scale=5.0), torch.Generator().manual_seed(0)
    pm = svdd(
        tiny_sd, prompts, posterior_mean_value(brightness), settings, num_candidates=6, generator=generator
    )
    bon = best_of_n(tiny_sd, prompts, brightness, settings, n=6, generator=generator).images
    pm = pm.images
    base = brightness(plain, prompts, None).mean()
    assert brightness(pm, prompts, None).mean() > base + 0.005
    assert brightness(bon, prompts, None).mean() > base + 0.005


def test_value_net_fits_a_known_reward_better_than_a_constant(tiny_sd, tmp_path):
    prompts = [f"a red circle {i % 4}" for i in range(160)]
    settings = SamplerSettings(num_steps=6, guidance_scale=5.0)
    train = value_targets(tiny_sd, prompts, brightness, settings, generator=torch.Generator().manual_seed(0))
    held = value_targets(
        tiny_sd, prompts[:24], brightness, settings, generator=torch.Generator().manual_seed(1)
    )
    net = train_value_net(train, epochs=20)
    path = tmp_path / "value.safetensors"
    save_value_net(net, path)
    loaded = load_value_net(path)
    latents, timesteps, text, target = held
    with torch.no_grad():
        mse = (loaded(latents, timesteps, text) - target).pow(2).mean()
    constant = (target - train[3].mean()).pow(2).mean()
    assert mse < 0.6 * constant, (mse, constant)  # measured about 0.4
    values = value_net_value(loaded)(
        tiny_sd, latents[:4], timesteps[:4], None, ["x"] * 4, torch.zeros(4, 77, text.shape[1])
    )
    assert values.shape == (4,) and torch.isfinite(values).all()


@pytest.mark.slow
def test_svdd_pm_raises_shapes_alignment_on_the_tiny_model():
    """SVDD-PM (M = 8) against plain sampling from the same seed on the 24 held-out one-object
    prompts, 4 images each: the paired gain must exceed twice its standard error."""
    tiny = load_pipeline("tiny")
    prompts = load_prompts("toy_heldout_single").prompts * 4
    reward_fn = rewards.get("shapes_alignment")
    settings = SamplerSettings(num_steps=4, guidance_scale=5.0)
    plain = sample_trajectories(tiny, prompts, settings, generator=torch.Generator().manual_seed(0)).images
    guided = svdd(
        tiny,
        prompts,
        posterior_mean_value(reward_fn),
        settings,
        num_candidates=8,
        generator=torch.Generator().manual_seed(0),
    ).images
    before, after = (reward_fn(images, prompts, [{} for _ in prompts]) for images in (plain, guided))
    gain = after - before
    stderr = gain.std() / len(gain) ** 0.5
    print(
        f"shapes_alignment plain {before.mean():.3f} -> SVDD-PM {after.mean():.3f} (gain {gain.mean():.3f} ± {stderr:.3f})"
    )
    assert gain.mean() > 2 * stderr


def test_cli_sample_and_train_value_write_their_outputs(tmp_path, capsys):
    import json

    from diffrl.cli import main

    common = [
        "tiny-sd",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--num-steps",
        "3",
        "--guidance-scale",
        "5",
    ]
    value_file = tmp_path / "value.safetensors"
    assert (
        main(
            [
                "train-value",
                "tiny-sd",
                "--prompts",
                "toy_train_single",
                "--reward",
                "jpeg_compressibility",
                "--num-rollouts",
                "8",
                "--num-steps",
                "3",
                "--guidance-scale",
                "5",
                "--epochs",
                "2",
                "--out",
                str(value_file),
            ]
        )
        == 0
    )
    for guidance, extra in [
        ("none", ["--reward", "jpeg_compressibility"]),
        ("svdd-pm", ["--reward", "jpeg_compressibility", "--M", "3"]),
        ("svdd-mc", ["--value-net", str(value_file), "--M", "3"]),
        ("best-of-n", ["--reward", "jpeg_compressibility", "--M", "2"]),
        ("smc", ["--reward", "jpeg_compressibility", "--M", "2", "--alpha", "0.5"]),
    ]:
        out = tmp_path / guidance
        assert main(["sample", *common, "--guidance", guidance, *extra, "--out", str(out)]) == 0
        table = json.loads((out / "rewards.json").read_text())
        assert [row["prompt"] for row in table["images"]] == ["a red circle", "a blue square"]
        assert (out / "grid.png").is_file() and (out / "images" / "0001.png").is_file()
        assert (out / "rewards.csv").read_text().splitlines()[0] == "index,prompt,reward,file"
    assert main(["sample", *common, "--guidance", "svdd-pm", "--out", str(tmp_path / "x")]) == 2
    assert "--guidance svdd-pm needs --reward" in capsys.readouterr().err
    readme = str(Path(__file__).parent.parent / "README.md")
    assert (
        main(
            ["sample", *common, "--guidance", "svdd-mc", "--value-net", readme, "--out", str(tmp_path / "y")]
        )
        == 2
    )
    assert "README.md: not a safetensors file" in capsys.readouterr().err
    lcm = ["tiny-lcm-random", "--prompt", "a red circle", "--num-steps", "4", "--guidance-scale", "8"]
    for guidance in ("none", "svdd-pm", "best-of-n"):
        out = tmp_path / f"lcm-{guidance}"
        assert (
            main(
                [
                    "sample",
                    *lcm,
                    "--guidance",
                    guidance,
                    "--reward",
                    "jpeg_compressibility",
                    "--M",
                    "2",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert (out / "images" / "0000.png").is_file()


def test_cli_sample_loads_the_lora_of_a_training_run(tmp_path):
    from pathlib import Path

    from diffrl.cli import main

    config = Path(__file__).parent.parent / "configs" / "ddpo" / "tiny_compressibility.yaml"
    fast = [
        "sample.num_steps=3",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "train.batch_size=4",
    ]
    assert (
        main(
            [
                "train",
                str(config),
                *fast,
                "run.num_epochs=1",
                "train.learning_rate=0.05",
                f"run.output_dir={tmp_path}",
                "run.name=r",
            ]
        )
        == 0
    )
    common = [
        "--prompt",
        "a red circle",
        "--num-steps",
        "3",
        "--guidance-scale",
        "5",
        "--guidance",
        "svdd-pm",
        "--reward",
        "jpeg_compressibility",
        "--M",
        "2",
    ]
    assert main(["sample", str(tmp_path / "r"), *common, "--out", str(tmp_path / "run")]) == 0
    assert main(["sample", "tiny-sd", *common, "--out", str(tmp_path / "base")]) == 0
    run, base = ((tmp_path / name / "images" / "0000.png").read_bytes() for name in ("run", "base"))
    assert run != base, "the run's LoRA changed the samples"


def test_svdd_runs_on_the_lcm_policy(tiny_lcm):
    """With an LCMScheduler pipeline the transition is the consistency step with its guidance
    embedding: M = 1 reproduces diffusers' own LCM pipeline, and M > 1 spends the same budget."""
    prompts = PROMPTS[:2]
    reference = tiny_lcm(
        prompts,
        num_inference_steps=4,
        guidance_scale=8.0,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
    ).images
    plain = svdd(
        tiny_lcm,
        prompts,
        None,
        SamplerSettings(num_steps=4, guidance_scale=8.0),
        num_candidates=1,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(plain.images, reference, rtol=0, atol=1e-5)
    rows, handle = _count_rows(tiny_lcm)
    try:
        guided = svdd(
            tiny_lcm,
            prompts,
            posterior_mean_value(brightness),
            SamplerSettings(num_steps=4, guidance_scale=8.0),
            num_candidates=3,
            generator=torch.Generator().manual_seed(2),
        )
    finally:
        handle.remove()
    assert guided.unet_calls == sum(rows) == 2 + 2 * 3 * 3  # no guidance doubling
    assert brightness(guided.images, prompts, None).mean() >= brightness(plain.images, prompts, None).mean()


def test_guided_sampling_on_the_flow_model(tmp_path):
    """On ``tiny-flow`` (an SD3 pipeline) the transition is the Flow-GRPO SDE and SVDD-PM's value
    reads x̂0 = x − σ v: M = 1 is plain SDE sampling draw for draw, the transformer is called once
    per candidate (CFG batched into the same call), and at equal seeds SVDD-PM, best-of-N and SMC
    each raise JPEG compressibility, the smooth reward of SVDD's Table 1, over plain sampling
    (by 0.018-0.025 kB here; the toy world's white scenes leave little to compress away)."""
    jpeg = rewards.get("jpeg_compressibility")
    flow = load_pipeline("tiny-flow")
    prompts = load_prompts("toy_heldout_single").prompts[:6]
    settings = SamplerSettings(num_steps=6, guidance_scale=5.0, eta=0.7)
    plain = sample_trajectories(flow, prompts, settings, generator=torch.Generator().manual_seed(0)).images
    one = svdd(flow, prompts, None, settings, num_candidates=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one.images, plain, rtol=0, atol=1e-5)
    calls = []
    handle = flow.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1), with_kwargs=True
    )
    try:
        pm = svdd(
            flow,
            prompts,
            posterior_mean_value(jpeg),
            settings,
            num_candidates=4,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert pm.unet_calls == 6 + 6 * 4 * 5 and len(calls) == 1 + 5  # one batched call per step
    bon = best_of_n(flow, prompts, jpeg, settings, n=4, generator=torch.Generator().manual_seed(0))
    particles = smc(
        flow,
        prompts,
        posterior_mean_value(jpeg),
        settings,
        num_particles=4,
        alpha=0.01,
        generator=torch.Generator().manual_seed(0),
    )
    base = jpeg(plain, prompts).mean()
    for guided in (pm, bon, particles):
        assert jpeg(guided.images, prompts).mean() > base + 0.008
