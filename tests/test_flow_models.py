"""Flow-matching pipelines as MDPs (issue #22): tiny SD3 and FLUX pipelines built in code sample
exactly as diffusers' own pipelines do, re-score their stored actions at ratio 1 in any batch
split, export LoRA that plain ``load_lora_weights`` reads back, load from folders, and train."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import FluxPipeline

from diffrl.cli import resolve_train_config
from diffrl.config import load_config
from diffrl.errors import ConfigError
from diffrl.files import read_jsonl
from diffrl.learner import prepare_denoiser, step_log_prob
from diffrl.pipelines import inspect_pipeline, load_pipeline
from diffrl.rollout import sample_trajectories
from diffrl.run import export_weights
from diffrl.testing import tiny_flux_pipeline, tiny_sd3_pipeline
from diffrl.trainer import preflight, train
from diffrl.transitions import FlowTransition, pack_latents, shift_mu, transition_for, unpack_latents
from diffrl.types import SamplerSettings

ROOT = Path(__file__).parent.parent
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
TOKENS = 16
MODELS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module", params=list(MODELS))
def flow_pipe(request):
    pipe = MODELS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pack_and_unpack_are_fluxs_layout_and_inverse():
    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 16)
    # token (row i, col j) holds channel c's 2x2 patch at positions 4c .. 4c + 3, row-major
    torch.testing.assert_close(packed[1, 1 * 4 + 2, 8:12], x[1, 2, 2:4, 4:6].reshape(-1))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)


def test_dynamic_shift_is_linear_in_the_token_count():
    pipe = tiny_flux_pipeline()
    assert shift_mu(pipe, 256) == pytest.approx(0.5) and shift_mu(pipe, 4096) == pytest.approx(1.15)
    assert shift_mu(pipe, 2176) == pytest.approx(0.825)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_the_ode_chain_is_the_diffusers_pipelines_own_sampler(flow_pipe, guidance):
    """eta = 0 is the Euler ODE: from the same x_T, the images equal the pipeline's ``__call__``
    (its schedule and shift, CFG for SD3 or the guidance embedding for FLUX, packing, decoding)."""
    settings = SamplerSettings(num_steps=4, guidance_scale=guidance, eta=0.0, max_sequence_length=TOKENS)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(flow_pipe, PROMPTS, settings, latents=x_T)
    assert traj.log_probs is None and traj.latents.shape == (3, 5, 4, 8, 8)
    flux = isinstance(flow_pipe, FluxPipeline)
    with torch.no_grad():
        want = flow_pipe(
            PROMPTS,
            num_inference_steps=4,
            guidance_scale=guidance,
            latents=pack_latents(x_T) if flux else x_T,
            height=32,
            width=32,
            max_sequence_length=TOKENS,
            output_type="pt",
        ).images
    torch.testing.assert_close(traj.images, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("step", ["sde", "cps"])
def test_stored_actions_rescore_at_ratio_one_in_any_batch_split(flow_pipe, step):
    """The SDE's (and CPS's) log-probs from sampling equal the training pass's, whether the samples
    are scored all together, one by one, or at mixed steps (the transformer's output does not
    depend on what else is in the batch). CPS's last step onto σ = 0 is deterministic: 3 actions."""
    settings = SamplerSettings(
        num_steps=4, guidance_scale=4.5, eta=0.7, max_sequence_length=TOKENS, flow_step=step
    )
    traj = sample_trajectories(flow_pipe, PROMPTS, settings, generator=torch.Generator().manual_seed(1))
    actions = 4 if step == "sde" else 3
    assert traj.log_probs.shape == (3, actions) and torch.isfinite(traj.log_probs).all()
    config = load_config(
        None,
        ["sample.num_steps=4", "sample.guidance_scale=4.5", "sample.eta=0.7", f"sample.flow_step={step}",
         f"sample.max_sequence_length={TOKENS}"],
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model = flow_pipe.transformer
    samples = torch.arange(3)
    for j in range(actions):
        steps = torch.full((3,), j)
        together = step_log_prob(model, flow_pipe, traj, samples, steps, config, accelerator)
        alone = torch.cat(
            [
                step_log_prob(model, flow_pipe, traj, samples[i : i + 1], steps[:1], config, accelerator)
                for i in range(3)
            ]
        )
        torch.testing.assert_close(together, traj.log_probs[:, j], rtol=0, atol=2e-5)
        torch.testing.assert_close(alone, together, rtol=0, atol=2e-5)
    mixed = torch.tensor([actions - 1, 0, 1])
    torch.testing.assert_close(
        step_log_prob(model, flow_pipe, traj, samples, mixed, config, accelerator),
        traj.log_probs[samples, mixed],
        rtol=0,
        atol=2e-5,
    )


def test_a_flow_step_off_the_schedule_is_refused(flow_pipe):
    transition = FlowTransition(flow_pipe, 1.0, 0.7)
    transition.schedule(4, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="not on the scheduler's schedule"):
        transition.step(torch.zeros(1, 4, 8, 8), torch.tensor([123.0]), torch.zeros(1, 4, 8, 8))


def test_lora_round_trips_through_plain_diffusers(tmp_path, flow_pipe):
    """The trained transformer LoRA, exported in diffusers format, is what a fresh pipeline of the
    same class gets from ``load_lora_weights``: the same velocity on the same input. The targets
    are the shipped flow configs' (image and text projections of the joint attention): diffusers'
    old-format key conversion renames only the first four, and a file mixing both formats loads
    without the renamed ones."""
    make = MODELS["flux" if type(flow_pipe).__name__ == "FluxPipeline" else "sd3"]
    pipe = make()
    targets = "[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out]"
    config = load_config(None, ["model.lora_rank=4", f"model.lora_target_modules={targets}"])
    prepare_denoiser(pipe, config, torch.float32)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    export_weights(pipe, True, tmp_path)
    fresh = make()
    fresh.load_lora_weights(str(tmp_path / "lora"))
    settings = SamplerSettings(num_steps=4, guidance_scale=1.0, max_sequence_length=TOKENS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    outputs = []
    for p in (pipe, fresh):
        transition = transition_for(p, settings)
        text = transition.encode(PROMPTS[:2], "", "cpu")
        with torch.no_grad():
            outputs.append(transition.noise_pred(x, torch.tensor(600.0), text))
    base = transition_for(make(), settings)
    with torch.no_grad():
        untrained = base.noise_pred(x, torch.tensor(600.0), base.encode(PROMPTS[:2], "", "cpu"))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    assert (outputs[0] - untrained).abs().max() > 1e-3  # the adapter changed the model
    loaded = {n.split(".lora_A")[0] for n, _ in fresh.transformer.named_parameters() if ".lora_A" in n}
    trained = {n.split(".lora_A")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A" in n}
    assert loaded == trained and any(n.endswith("attn.to_q") for n in loaded)


def test_saved_flow_pipelines_load_by_folder(tmp_path, flow_pipe):
    folder = tmp_path / "model"
    flow_pipe.save_pretrained(folder)
    info = inspect_pipeline(str(folder))
    flux = type(flow_pipe).__name__ == "FluxPipeline"
    assert info.family == "flow" and info.vae_scale_factor == 4
    assert info.latent_channels == 4
    assert info.resolution == (512 if flux else 32)  # FLUX's native size is its pipeline's default 128 cells
    loaded = load_pipeline(str(folder))
    assert type(loaded) is type(flow_pipe)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = SamplerSettings(
        num_steps=2, guidance_scale=1.0, eta=0.0, height=32, width=32, max_sequence_length=TOKENS
    )
    torch.testing.assert_close(
        sample_trajectories(loaded, PROMPTS[:1], settings, latents=x_T).images,
        sample_trajectories(flow_pipe, PROMPTS[:1], settings, latents=x_T).images,
        rtol=0,
        atol=1e-5,
    )


def test_preflight_names_the_algorithms_a_flow_model_trains(tmp_path):
    from diffrl import algorithms

    assert {"grpo", "ddpo"} <= set(algorithms.trained_on("flow")) and "rlcm" not in algorithms.trained_on(
        "flow"
    )
    config = load_config(
        str(ROOT / "configs" / "rlcm" / "tiny_alignment.yaml"),
        ["model.pretrained=tiny-sd3-random", f"run.output_dir={tmp_path}"],
    )
    with pytest.raises(ConfigError, match="a flow-matching model .* train it with algorithm: ddpo, .*grpo"):
        preflight(config, algorithms.get(config.algorithm), torch.device("cpu"))


def test_grpo_trains_a_flow_model_and_leaves_the_reference(tmp_path):
    """Two GRPO epochs on the tiny SD3 pipeline with the Flow-GRPO SDE: every epoch's first term
    passes the ratio check, chains are trained, and the exact KL to the LoRA-disabled reference
    grows from (near) zero."""
    overrides = [
        "model.pretrained=tiny-sd3-random", "sample.num_steps=4", "sample.eta=0.7", "sample.guidance_scale=4.5",
        f"sample.max_sequence_length={TOKENS}", "sample.batch_size=8", "train.batch_size=4",
        "train.gradient_accumulation_steps=1", "grpo.group_size=4", "reward.name=jpeg_compressibility",
        "prompts.source=toy_train_single", "run.num_epochs=2", "run.save_freq=100", f"run.output_dir={tmp_path}",
        "train.learning_rate=3e-3",
    ]  # fmt: skip
    train(resolve_train_config(str(ROOT / "configs" / "grpo" / "tiny_geneval.yaml"), overrides, None))
    records = read_jsonl(tmp_path / "grpo_tiny_geneval" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1] and records[1]["num_trained"] > 0
    assert 0 < records[0]["kl"] < records[1]["kl"], [r["kl"] for r in records]
    assert (tmp_path / "grpo_tiny_geneval" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_sd3_text_is_the_pipelines_encoding_and_its_cache_sees_every_encoder():
    """Cached SD3 text (per-token and pooled, prompt and negative) equals ``encode_prompt``'s; a
    weight change in the T5 encoder (not the first one) empties the cache."""
    from diffrl.text import encode_prompts

    pipe = tiny_sd3_pipeline(seed=4)
    want = pipe.encode_prompt(PROMPTS, None, None, negative_prompt="blurry", max_sequence_length=TOKENS)
    text = encode_prompts(pipe, PROMPTS, "blurry", True, "cpu", TOKENS)
    for got, expected in zip((text.embeds, text.negative, text.pooled, text.negative_pooled), want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        next(pipe.text_encoder_3.parameters()).add_(0.5)
    changed = encode_prompts(pipe, PROMPTS, "blurry", True, "cpu", TOKENS)
    fresh = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=TOKENS
    )
    torch.testing.assert_close(changed.embeds, fresh[0], rtol=0, atol=1e-5)
    assert (changed.embeds - text.embeds).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_the_t5_length_defaults_to_the_pipeline_capped_by_its_tokenizer(name):
    """Unset, prompts get the pipeline's own default T5 length (SD3 256, FLUX 512) unless the T5
    tokenizer says the model holds fewer (``model_max_length``): the encoding is then the
    pipeline's at that length; a length that is asked for is kept."""
    from diffrl.text import T5_DEFAULT_TOKENS, encode_prompts, t5_tokens

    pipe = MODELS[name]()
    tokenizer = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer_3
    default = T5_DEFAULT_TOKENS[type(pipe).__name__]
    assert t5_tokens(pipe, None) == default and t5_tokens(pipe, 7) == 7
    tokenizer.model_max_length = 12
    assert t5_tokens(pipe, None) == 12 and t5_tokens(pipe, 40) == 40
    text = encode_prompts(pipe, PROMPTS[:1], None, False, "cpu")
    clip_tokens = 0 if name == "flux" else pipe.tokenizer_max_length
    assert text.embeds.shape[1] == clip_tokens + 12
    sd3_args = {} if name == "flux" else {"prompt_3": None, "do_classifier_free_guidance": False}
    want = pipe.encode_prompt(PROMPTS[:1], None, max_sequence_length=12, **sd3_args)[0]
    torch.testing.assert_close(text.embeds, want, rtol=0, atol=1e-5)
