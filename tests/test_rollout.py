import pytest
import torch

import diffrl.text as text_module
from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.rollout import sample_trajectories
from diffrl.text import encode_prompts
from diffrl.transitions import guided_noise_pred
from diffrl.types import SamplerSettings

PROMPTS = ["a red circle", "a small blue square on the left", "a cat"]


@pytest.fixture(scope="module")
def trajectory(tiny_sd):
    return sample_trajectories(
        tiny_sd,
        PROMPTS,
        SamplerSettings(num_steps=8, guidance_scale=5.0, eta=1.0),
        generator=torch.Generator().manual_seed(0),
    )


def test_trajectory_shapes(trajectory):
    assert trajectory.latents.shape == (3, 9, 4, 8, 8)
    assert trajectory.log_probs.shape == (3, 8) and trajectory.log_probs.dtype == torch.float32
    assert trajectory.timesteps.tolist() == list(range(876, 0, -125))
    assert trajectory.images.shape == (3, 3, 32, 32)
    assert 0 <= trajectory.images.min() and trajectory.images.max() <= 1
    assert trajectory.text.embeds.shape == trajectory.text.negative.shape == (3, 77, 32)
    assert not trajectory.latents.requires_grad and not trajectory.log_probs.requires_grad


def test_rescoring_stored_actions_gives_zero_log_ratio(tiny_sd, trajectory):
    """Re-score each stored transition as training does: per-sample shuffled timesteps."""
    tr = trajectory
    perm = torch.stack(
        [torch.randperm(tr.num_steps, generator=torch.Generator().manual_seed(b)) for b in range(3)]
    )
    rows = torch.arange(3)
    tiny_sd.scheduler.set_timesteps(tr.num_steps)
    with torch.no_grad():
        for j in range(tr.num_steps):
            index = perm[:, j]
            t = tr.timesteps[index]
            noise_pred = guided_noise_pred(
                tiny_sd.unet, tr.latents[rows, index], t, tr.text.embeds, tr.text.negative, 5.0
            )
            out = ddim_step_with_logprob(
                tiny_sd.scheduler,
                noise_pred,
                t,
                tr.latents[rows, index],
                eta=1.0,
                prev_sample=tr.latents[rows, index + 1],
            )
            assert (out.log_prob - tr.log_probs[rows, index]).abs().max() < 1e-5


def test_same_generator_seed_reproduces_the_trajectory(tiny_sd, trajectory):
    again = sample_trajectories(
        tiny_sd,
        PROMPTS,
        SamplerSettings(num_steps=8, guidance_scale=5.0, eta=1.0),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(again.latents, trajectory.latents, rtol=0, atol=0)


def test_eta0_image_matches_diffusers_pipeline(tiny_sd):
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = sample_trajectories(
        tiny_sd, PROMPTS[:2], SamplerSettings(num_steps=10, guidance_scale=5.0, eta=0.0), latents=x_t
    )
    reference = tiny_sd(
        PROMPTS[:2], num_inference_steps=10, guidance_scale=5.0, eta=0.0, latents=x_t, output_type="pt"
    ).images
    assert ours.log_probs is None
    torch.testing.assert_close(ours.images, reference, rtol=1e-4, atol=1e-4)


def test_no_guidance_uses_conditional_prediction_only(tiny_sd):
    tr = sample_trajectories(
        tiny_sd,
        PROMPTS[:1],
        SamplerSettings(num_steps=4, guidance_scale=1.0, eta=1.0),
        generator=torch.Generator().manual_seed(1),
    )
    assert tr.text.negative is None
    tiny_sd.scheduler.set_timesteps(4)
    with torch.no_grad():
        eps = tiny_sd.unet(tr.latents[:, 0], tr.timesteps[0], encoder_hidden_states=tr.text.embeds).sample
        out = ddim_step_with_logprob(
            tiny_sd.scheduler, eps, tr.timesteps[0], tr.latents[:, 0], prev_sample=tr.latents[:, 1]
        )
    torch.testing.assert_close(out.log_prob, tr.log_probs[:, 0], rtol=0, atol=1e-5)


def test_bad_sizes_are_rejected_early(tiny_sd):
    with pytest.raises(ValueError, match="multiples of 4"):
        sample_trajectories(tiny_sd, ["x"], SamplerSettings(num_steps=2, height=30))
    with pytest.raises(ValueError, match="latents shape"):
        sample_trajectories(tiny_sd, ["x"], SamplerSettings(num_steps=2), latents=torch.zeros(2, 4, 8, 8))


def _encoder_calls(pipe):
    """A list that gets one entry (the batch size) per text-encoder forward; remove the hook after."""
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_prompt_embeddings_are_cached_and_equal_the_pipelines(monkeypatch):
    from diffrl.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=1)  # its own: this test changes the text encoder
    prompts = ["a red circle", "a blue square", "a red circle"]
    want, want_negative = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["blurry"] * 3)
    calls, handle = _encoder_calls(pipe)
    text = encode_prompts(pipe, prompts, "blurry", True)
    embeds, negative = text.embeds, text.negative
    torch.testing.assert_close(embeds, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(negative, want_negative, rtol=0, atol=1e-6)
    assert calls == [1, 1, 1]  # the two distinct prompts and the negative one, each alone
    encode_prompts(pipe, ["a blue square", "a green triangle"], "blurry", True)
    assert calls == [1] * 4  # only the new prompt
    with torch.no_grad():  # an in-place weight change (a LoRA fused, a state dict loaded) empties the cache
        dict(pipe.text_encoder.named_parameters())["final_layer_norm.bias"].add_(0.5)
    changed = encode_prompts(pipe, prompts, "blurry", True).embeds
    assert calls == [1] * 7
    fresh, _ = pipe.encode_prompt(prompts, "cpu", 1, False)  # (counted too)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=1e-6)
    assert (changed - embeds).abs().max() > 0.1
    calls.clear()
    monkeypatch.setattr(text_module, "PROMPT_CACHE_SIZE", 2)  # least recently used dropped
    encode_prompts(pipe, ["x", "y", "z"], None, False)
    encode_prompts(pipe, ["z"], None, False)
    encode_prompts(pipe, ["x"], None, False)
    handle.remove()
    assert calls == [1] * 4  # "z" was kept, "x" dropped


def test_the_execution_device_is_diffusers_own_and_defers_to_it_under_offloading(tiny_sd, monkeypatch):
    """Without offloading hooks the denoiser's device is what ``pipe._execution_device`` finds by
    walking every module; with a hook on any component the lookup is diffusers' own."""
    from diffrl.transitions import execution_device

    assert execution_device(tiny_sd) == tiny_sd._execution_device == torch.device("cpu")
    monkeypatch.setattr(type(tiny_sd), "_execution_device", property(lambda self: torch.device("meta")))
    assert execution_device(tiny_sd) == torch.device("cpu")  # no hook: not asked
    monkeypatch.setattr(tiny_sd.text_encoder, "_hf_hook", object(), raising=False)
    assert execution_device(tiny_sd) == torch.device("meta")
