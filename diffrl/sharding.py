"""Full tensors from FSDP2 shards and back (accelerate's FSDP with ``fsdp_version: 2``:
``configs/accelerate/fsdp.yaml``).

Under FSDP2 every parameter of the denoiser is a ``DTensor`` holding this process's shard. What
diffrl writes — checkpoints, the moving average, exported weights — is the full tensor, gathered
with :meth:`DTensor.full_tensor` (a collective: every process calls it, in the same order), and
what it reads back is split into this process's shard again. Without FSDP these functions pass
tensors through unchanged.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: torch.nn.Module | None) -> None:
    """Register the shards as ``model``'s parameters again. FSDP2 keeps the root module's
    parameters gathered after a forward pass outside autograd (sampling); reading or writing them
    then would miss the shards (what the optimizer steps and the next gather reads)."""
    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (collective), or ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a shard, or ``t`` itself (for checks that need no collective)."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole_on_cpu(named, keep: bool = True) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` for ``named`` [(name, tensor or shard)], gathered one at a
    time (a collective under FSDP: every process calls it; those with ``keep=False`` take part in
    the gathers and keep nothing), so only one tensor at a time is whole on the device."""
    state = {}
    for name, t in named:
        whole = full_tensor(t.detach())
        if keep:
            state[name] = whole.to("cpu", copy=True).contiguous()
    return state


@torch.no_grad()
def copy_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)``; for a shard ``dst``, this process's part of ``full``."""
    if isinstance(dst, DTensor):
        full = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(full)
