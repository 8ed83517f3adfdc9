"""Stochastic sampler steps seen as Gaussian policies, one file per sampler family."""

from diffrl.policies.ddim import ddim_step_with_logprob

__all__ = ["ddim_step_with_logprob"]
