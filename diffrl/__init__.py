"""diffrl: reinforcement learning and preference optimisation for diffusion models."""

from diffrl import rewards
from diffrl.ops import gaussian_logprob
from diffrl.pipelines import load_pipeline
from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.prompts import PromptSource, load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.types import SamplerSettings, StepOutput, Trajectory

__version__ = "0.1.0"

__all__ = [
    "PromptSource",
    "SamplerSettings",
    "StepOutput",
    "Trajectory",
    "ddim_step_with_logprob",
    "gaussian_logprob",
    "load_pipeline",
    "load_prompts",
    "rewards",
    "sample_trajectories",
]
