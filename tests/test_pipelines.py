import pytest
import torch
from diffusers import (
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)

from diffrl import load_pipeline
from diffrl.pipelines import PipelineNotFoundError


def _n_params(pipe):
    return sum(
        p.numel() for name in ("unet", "vae", "text_encoder") for p in getattr(pipe, name).parameters()
    )


def test_tiny_pipelines_are_the_real_classes(tiny_sd, tiny_lcm):
    assert isinstance(tiny_sd, StableDiffusionPipeline) and isinstance(tiny_sd.scheduler, DDIMScheduler)
    assert isinstance(tiny_lcm, LatentConsistencyModelPipeline) and isinstance(
        tiny_lcm.scheduler, LCMScheduler
    )
    assert tiny_lcm.unet.config.time_cond_proj_dim is not None
    assert 0.8e6 < _n_params(tiny_sd) < 2.5e6
    # SD 1.x betas: alphas_cumprod[999] of scaled_linear 0.00085..0.012
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(tiny_sd.scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


def test_tiny_pipeline_is_deterministic_in_seed():
    from diffrl.testing import tiny_sd_pipeline

    a, b, c = tiny_sd_pipeline(0), tiny_sd_pipeline(0), tiny_sd_pipeline(1)
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def _images(pipe, **kwargs):
    return pipe("a red circle", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_local_sd_folder_roundtrip(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"))
    assert isinstance(loaded, StableDiffusionPipeline) and isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.safety_checker is None
    kwargs = dict(num_inference_steps=5, eta=1.0)
    torch.testing.assert_close(_images(loaded, **kwargs), _images(tiny_sd, **kwargs))


def test_local_lcm_folder_roundtrip(tiny_lcm, tmp_path):
    tiny_lcm.save_pretrained(tmp_path / "lcm")
    loaded = load_pipeline(str(tmp_path / "lcm"))
    assert isinstance(loaded, LatentConsistencyModelPipeline) and isinstance(loaded.scheduler, LCMScheduler)
    torch.testing.assert_close(
        _images(loaded, num_inference_steps=4), _images(tiny_lcm, num_inference_steps=4)
    )


def test_builtin_names_resolve():
    assert isinstance(load_pipeline("tiny-sd"), StableDiffusionPipeline)
    assert isinstance(load_pipeline("tiny-lcm-random"), LatentConsistencyModelPipeline)
    assert load_pipeline("tiny-sd", torch_dtype=torch.float16).unet.dtype == torch.float16


def test_uncached_hub_id_offline_fails_with_instructions():
    with pytest.raises(PipelineNotFoundError, match="pass its path"):
        load_pipeline("no-such-org/no-such-model", local_files_only=True)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(PipelineNotFoundError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "nothing-here"))
