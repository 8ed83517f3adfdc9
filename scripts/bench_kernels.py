"""Reference (torch) vs fused (Triton) time, peak memory and achieved bandwidth of each op.

Shapes: Stable Diffusion latents [B, 4, 64, 64] for B in 1..64 and SDXL latents [B, 4, 128, 128].
Each op is timed forward + backward (where it has one), interleaving reference and fused runs.
On CUDA, achieved GB/s (bytes the op must move at least, over time) is reported against the
device's peak memory bandwidth (target: fused forward+backward >= 70% of peak). On a machine
without a GPU only the reference is timed, and the table says so.

    python scripts/bench_kernels.py [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffrl import ops


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bandwidth_gbs(device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (memory clock x bus width x 2, DDR)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _cases(shape, device, dtype):
    """(name, reference fn, fused fn, bytes moved by forward+backward) for each op."""
    from triton_kernels.ddim_step_logprob import ddim_step_logprob, ddim_step_logprob_reference
    from triton_kernels.eps_mse import eps_mse, eps_mse_reference
    from triton_kernels.gaussian_logprob import gaussian_logprob, gaussian_logprob_reference

    b, n = shape[0], torch.Size(shape[1:]).numel()
    el = torch.tensor([], dtype=dtype).element_size()
    x, prev = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    mean = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    std = torch.rand(b, 1, 1, 1, device=device) + 0.5
    coef = [torch.rand(b, device=device) + 0.5 for _ in range(3)]

    def run(fn, *args):
        out = fn(*args)
        out = out[2] if isinstance(out, tuple) else out
        out.sum().backward()

    return [
        # forward reads x, mean; backward reads x, mean and writes grad_mean
        (
            "gaussian_logprob",
            lambda: run(gaussian_logprob_reference, x, mean, std),
            lambda: run(gaussian_logprob, x, mean, std),
            5 * b * n * el,
        ),
        (
            "eps_mse",
            lambda: run(eps_mse_reference, mean, prev),
            lambda: run(eps_mse, mean, prev),
            5 * b * n * el,
        ),
        # forward reads x, eps, prev; backward reads x, eps, prev and writes grad_eps (training: no mean write)
        (
            "ddim_step_logprob",
            lambda: run(ddim_step_logprob_reference, x, mean, *coef, None, prev),
            lambda: run(lambda *a: ddim_step_logprob(*a, write_mean=False), x, mean, *coef, None, prev),
            7 * b * n * el,
        ),
    ]


def _time(fn, device, repeats):
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    fused_ok = device.type == "cuda" and ops.kernel_mode() != "torch"
    peak_bw = _peak_bandwidth_gbs(device)
    if not fused_ok:
        print(f"No CUDA device: only the torch reference was timed (on {device}); fused columns are empty.")
    shapes = [(b, 4, 64, 64) for b in (1, 4, 16, 64)] + [(b, 4, 128, 128) for b in (1, 8)]
    if device.type == "cpu":
        shapes = shapes[:3]
    rows = []
    print(f"peak memory bandwidth: {peak_bw:.0f} GB/s" if peak_bw else "peak memory bandwidth: unknown")
    print(
        "| op | shape | reference ms | fused ms | speed-up | fused GB/s | % of peak | ref MiB | fused MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for name, reference, fused, nbytes in _cases(shape, device, dtype):
            ref_t, ref_mem = _time(reference, device, args.repeats)
            fused_t, fused_mem = _time(fused, device, args.repeats) if fused_ok else (None, None)
            gbs = nbytes / fused_t / 1e9 if fused_t else None
            row = dict(
                op=name,
                shape=list(shape),
                reference_ms=ref_t * 1e3,
                fused_ms=fused_t and fused_t * 1e3,
                fused_gbs=gbs,
                peak_fraction=gbs / peak_bw if gbs and peak_bw else None,
                reference_mib=ref_mem,
                fused_mib=fused_mem,
            )
            rows.append(row)
            fmt = lambda v, f: "—" if v is None else format(v, f)
            print(
                f"| {name} | {tuple(shape)} | {ref_t * 1e3:.3f} | {fmt(row['fused_ms'], '.3f')} | "
                f"{fmt(fused_t and ref_t / fused_t, '.2f')} | {fmt(gbs, '.0f')} | {fmt(row['peak_fraction'] and 100 * row['peak_fraction'], '.0f')} | "
                f"{fmt(ref_mem, '.0f')} | {fmt(fused_mem, '.0f')} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "dtype": args.dtype, "peak_gbs": peak_bw, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
