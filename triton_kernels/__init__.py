"""Fused Triton kernels for diffrl's log-prob and loss hot spots.

Each op lives in its own file (torch reference, kernels, launcher, autograd.Function);
``diffrl.ops`` dispatches to them. The torch references in ``diffrl.ops`` are the specification.
"""
