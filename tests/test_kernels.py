"""Fused Triton kernels against their torch references, run on CPU by the Triton interpreter
(TRITON_INTERPRET=1 is set in conftest.py before triton is imported), or compiled on a GPU with
TRITON_INTERPRET=0 DIFFRL_TEST_DEVICE=cuda (scripts/gpu_check.sh)."""

import os

import pytest
import torch
from peft import LoraConfig

from diffrl import ops
from diffrl.algorithms.ddpo import ppo_loss
from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.rollout import sample_trajectories
from diffrl.testing import tiny_sd_pipeline
from diffrl.transitions import guided_noise_pred
from diffrl.types import SamplerSettings
from triton_kernels.ddim_step_logprob import ddim_step_logprob, ddim_step_logprob_reference
from triton_kernels.eps_mse import eps_mse, eps_mse_reference
from triton_kernels.gaussian_logprob import gaussian_logprob, gaussian_logprob_reference

DEVICE = torch.device(os.environ.get("DIFFRL_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """conftest pins the references for the rest of the suite; here the dispatch is under test."""
    monkeypatch.setenv("DIFFRL_KERNELS", "auto")


SHAPES = [(1, 4, 8, 8), (3, 4, 5, 7), (2, 3, 1100)]  # B=1, odd sizes, more than one 1024-element chunk
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (values, gradients) tolerances per input dtype; everything accumulates in float32
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 2e-2), torch.float16: (1e-4, 2e-3)}


def _randn(shape, dtype, seed, noncontiguous=False):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if noncontiguous:  # same values, transposed storage
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.to(DEVICE, dtype)


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_logprob_kernel(shape, dtype):
    value_tol, grad_tol = TOL[dtype]
    x = _randn(shape, dtype, 0, noncontiguous=True).requires_grad_(True)
    mean = _randn(shape, dtype, 1).requires_grad_(True)
    std = (torch.rand(shape[0], generator=torch.Generator().manual_seed(2)) + 0.5).view(
        -1, *[1] * (len(shape) - 1)
    )
    std = std.to(DEVICE).requires_grad_(True)
    fused, reference = gaussian_logprob(x, mean, std), gaussian_logprob_reference(x, mean, std)
    assert fused.dtype == torch.float32 and fused.shape == (shape[0],)
    _close(fused, reference, value_tol)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads_fused = torch.autograd.grad(fused, (x, mean, std), upstream)
    grads_ref = torch.autograd.grad(reference, (x, mean, std), upstream)
    for got, want in zip(grads_fused, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        _close(got, want, grad_tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eps_mse_kernel(shape, dtype):
    value_tol, grad_tol = TOL[dtype]
    pred = _randn(shape, dtype, 4, noncontiguous=True).requires_grad_(True)
    target = _randn(shape, dtype, 5).requires_grad_(True)
    fused, reference = eps_mse(pred, target), eps_mse_reference(pred, target)
    _close(fused, reference, value_tol)
    upstream = torch.rand(shape[0], generator=torch.Generator().manual_seed(6)).to(DEVICE)
    for got, want in zip(
        torch.autograd.grad(fused, (pred, target), upstream),
        torch.autograd.grad(reference, (pred, target), upstream),
    ):
        assert got.dtype == dtype
        _close(got, want, grad_tol)


def _coefficients(batch, seed=7):
    g = torch.Generator().manual_seed(seed)
    a, b, std = (
        torch.rand(batch, generator=g) + 0.5,
        torch.randn(batch, generator=g),
        torch.rand(batch, generator=g) + 0.1,
    )
    return a.to(DEVICE), b.to(DEVICE), std.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_kernel_scoring(shape, dtype):
    value_tol, grad_tol = TOL[dtype]
    a, b, std = _coefficients(shape[0])
    x, prev = _randn(shape, dtype, 8), _randn(shape, dtype, 9, noncontiguous=True)
    eps = _randn(shape, dtype, 10).requires_grad_(True)
    mean, out_prev, log_prob = ddim_step_logprob(x, eps, a, b, std, prev_sample=prev)
    ref_mean, _, ref_log_prob = ddim_step_logprob_reference(x, eps, a, b, std, prev_sample=prev)
    _close(mean, ref_mean, value_tol)
    _close(log_prob, ref_log_prob, value_tol)
    assert torch.equal(out_prev, prev)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(11)).to(DEVICE)
    _close(
        torch.autograd.grad(log_prob, eps, upstream)[0],
        torch.autograd.grad(ref_log_prob, eps, upstream)[0],
        grad_tol,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_kernel_sampling_scores_what_it_stores(shape, dtype):
    a, b, std = _coefficients(shape[0])
    x, eps, z = _randn(shape, dtype, 12), _randn(shape, dtype, 13), _randn(shape, dtype, 14)
    mean, prev, log_prob = ddim_step_logprob(x, eps, a, b, std, noise=z)
    ref_mean, ref_prev, _ = ddim_step_logprob_reference(x, eps, a, b, std, noise=z)
    assert prev.dtype == dtype
    _close(mean, ref_mean, TOL[dtype][0])
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-5 * 8, torch.float16: 2**-9 * 8}[
        dtype
    ]  # rounding of the store
    _close(prev, ref_prev, ulp)
    # the log-prob is that of the stored (rounded) action
    _close(log_prob, ddim_step_logprob_reference(x, eps, a, b, std, prev_sample=prev)[2], 1e-4)
    if dtype == torch.float32:  # and, exactly, mean(-z^2/2) - log sigma - log(2 pi)/2
        expected = (-(z.float() ** 2) / 2).flatten(1).mean(1) - torch.log(std) - 0.9189385332046727
        _close(log_prob, expected, 1e-5)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFRL_KERNELS", "torch")
    assert not ops.use_triton(cpu)
    monkeypatch.setenv("DIFFRL_KERNELS", "auto")
    assert ops.use_triton(cpu)  # TRITON_INTERPRET=1 (conftest)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.use_triton(cpu)  # CPU tensors, no interpreter: the reference
    monkeypatch.setenv("DIFFRL_KERNELS", "triton")
    with pytest.raises(
        RuntimeError,
        match="DIFFRL_KERNELS=triton but the fused gaussian_logprob cannot run: the tensors are on cpu",
    ):
        ops.gaussian_logprob(cpu.view(2, 1), cpu.view(2, 1), torch.ones(2, 1))
    monkeypatch.setenv("DIFFRL_KERNELS", "fast")
    with pytest.raises(ValueError, match="DIFFRL_KERNELS='fast'"):
        ops.use_triton(cpu)


def test_ops_use_the_kernels_only_when_allowed(monkeypatch):
    calls = []
    import triton_kernels.eps_mse as module

    real = module.eps_mse
    monkeypatch.setattr(module, "eps_mse", lambda p, t: calls.append(1) or real(p, t))
    pred, target = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    monkeypatch.setenv("DIFFRL_KERNELS", "torch")
    reference = ops.eps_mse(pred, target)
    assert calls == []
    monkeypatch.setenv("DIFFRL_KERNELS", "auto")
    torch.testing.assert_close(ops.eps_mse(pred, target), reference)
    assert calls == [1]
    # a full-shape std has no fused kernel: auto takes the reference, forced triton says why
    x, std = torch.randn(2, 3, device=DEVICE), torch.rand(2, 3, device=DEVICE) + 0.5
    torch.testing.assert_close(
        ops.gaussian_logprob(x, x * 0, std), torch.distributions.Normal(0.0, std).log_prob(x).mean(1)
    )
    monkeypatch.setenv("DIFFRL_KERNELS", "triton")
    with pytest.raises(ValueError, match="one std per sample"):
        ops.gaussian_logprob(x, x * 0, std)


def _ddpo_step_loss_and_grads():
    """One DDPO minibatch-timestep on a tiny LoRA pipeline: the PPO loss and the LoRA gradients."""
    pipe = tiny_sd_pipeline(0).to(DEVICE)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained-looking adapter, so the ratio is not exactly 1
    traj = sample_trajectories(
        pipe,
        ["a red circle", "a blue square"],
        SamplerSettings(num_steps=4),
        generator=torch.Generator().manual_seed(1),
    )
    pipe.scheduler.set_timesteps(4)
    j = torch.tensor([1, 3], device=DEVICE)
    rows = torch.arange(2, device=DEVICE)
    x_t, prev = traj.latents[rows, j], traj.latents[rows, j + 1]
    noise_pred = guided_noise_pred(
        pipe.unet, x_t, traj.timesteps[j], traj.text.embeds, traj.text.negative, 5.0
    )
    out = ddim_step_with_logprob(pipe.scheduler, noise_pred, traj.timesteps[j], x_t, prev_sample=prev)
    advantages = torch.tensor([1.0, -0.5], device=DEVICE)
    loss, _ = ppo_loss(out.log_prob, traj.log_probs[rows, j] - 1e-3, advantages, 1e-2, 5.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.grad is not None}
    return loss.detach(), traj.log_probs, grads


def test_ddpo_step_is_the_same_with_torch_and_triton_kernels(monkeypatch):
    monkeypatch.setenv("DIFFRL_KERNELS", "torch")
    loss_torch, logp_torch, grads_torch = _ddpo_step_loss_and_grads()
    monkeypatch.setenv("DIFFRL_KERNELS", "triton")
    loss_triton, logp_triton, grads_triton = _ddpo_step_loss_and_grads()
    torch.testing.assert_close(logp_triton, logp_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_triton, loss_torch, rtol=1e-5, atol=1e-6)
    assert grads_torch.keys() == grads_triton.keys() and len(grads_torch) > 0
    for name in grads_torch:
        # atol relative to the tensor's scale: CUDA's own reductions differ run to run at ~1e-6
        scale = grads_torch[name].abs().max().item()
        torch.testing.assert_close(grads_triton[name], grads_torch[name], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_flow_steps_are_the_same_with_the_fused_kernel(monkeypatch, kind):
    """The flow SDE (a σ = 1 sample among them) and CPS steps through the fused affine kernel equal
    their torch reference: the action drawn from the same generator, the log-prob of a given
    action, and its gradient to the velocity."""
    from diffrl.policies.flow import flow_step_with_logprob

    g = torch.Generator().manual_seed(0)
    x, v, prev = (torch.randn(3, 4, 8, 8, generator=g).to(DEVICE) for _ in range(3))
    # the SDE onto σ' = 0 is stochastic; CPS onto 0 is deterministic (no action, see FlowTransition)
    sigma, sigma_next = (
        torch.tensor([1.0, 0.6, 0.3]),
        torch.tensor([0.8, 0.45, 0.0 if kind == "sde" else 0.1]),
    )
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("DIFFRL_KERNELS", mode)
        velocity = v.clone().requires_grad_(True)
        common = dict(kind=kind, noise_level=0.7, sigma_after_one=0.8)
        drawn = flow_step_with_logprob(
            v, x, sigma, sigma_next, generator=torch.Generator(DEVICE).manual_seed(1), **common
        )
        scored = flow_step_with_logprob(velocity, x, sigma, sigma_next, prev_sample=prev, **common)
        grad = torch.autograd.grad(scored.log_prob.sum(), velocity)[0]
        results[mode] = (drawn.prev_sample, drawn.log_prob, scored.log_prob, grad)
    for got, want in zip(results["triton"], results["torch"]):
        _close(got, want, 1e-5)
