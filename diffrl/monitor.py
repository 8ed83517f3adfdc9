"""A reward-hacking monitor: flags epochs where the optimised reward climbs while simple statistics
of the images drift — the signature of over-optimisation (Gao et al. 2023; in diffusion RL: DDPO's
aesthetic runs turning saturated and cartoonish, Flow-GRPO's OCR runs losing diversity).

Every epoch's images give (all in [0, 1], ``[N, 3, H, W]`` float images in [0, 1]):

* ``saturation``: mean HSV saturation (max − min) / max over channels,
* ``dark`` / ``bright``: fraction of pixels with luma (Rec. 601) below 0.05 / above 0.95,
* ``high_freq``: share of the luma spectrum's energy (mean removed) above half the Nyquist radius,
* ``diversity``: :func:`diffrl.evaluation.diversity` among the images of each prompt, averaged.

The monitor's baseline is the mean of the first ``monitor.baseline_epochs`` epochs. An epoch is
flagged when the reward, averaged over the last ``monitor.window`` epochs, is more than
``monitor.reward_rise`` baseline standard deviations above the baseline reward while some
statistic, averaged the same way, is more than ``monitor.tolerance`` from its baseline, or an
evaluation reward the run does not optimise (``eval_<label>``, section ``eval``; its latest value
until the next evaluation) fell by more than that fraction of its first value.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from diffrl.files import read_jsonl

STATISTICS = ("saturation", "dark", "bright", "high_freq", "diversity")


def image_statistics(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The five statistics of ``images [N, 3, H, W]`` in [0, 1] with their ``prompts``
    (``diversity`` over groups of equal prompts; 0 without any prompt drawn twice)."""
    from diffrl.evaluation import diversity

    x = images.detach().float().clamp(0, 1)
    high, low = x.max(dim=1).values, x.min(dim=1).values
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    power = torch.fft.fft2(luma - luma.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    upper = (fx**2 + fy**2).sqrt() > 0.25  # half of the Nyquist frequency, 0.5 cycles per pixel
    total = power.sum(dim=(-2, -1))
    share = torch.where(total > 0, (power * upper).sum(dim=(-2, -1)) / total.clamp(min=1e-12), 0.0)
    groups = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    spreads = [diversity(x[idx]) for idx in groups.values() if len(idx) > 1]
    return {
        "saturation": ((high - low) / high.clamp(min=1e-6)).mean().item(),
        "dark": (luma < 0.05).float().mean().item(),
        "bright": (luma > 0.95).float().mean().item(),
        "high_freq": share.mean().item(),
        "diversity": sum(spreads) / len(spreads) if spreads else 0.0,
    }


class HackingMonitor:
    """Watches the epochs' records (``reward_mean``, ``reward_std`` and ``image_<statistic>``) and
    says, per epoch, why it looks like reward hacking (an empty list when it does not)."""

    def __init__(
        self,
        baseline_epochs: int = 3,
        window: int = 3,
        reward_rise: float = 0.5,
        tolerance: float = 0.1,
        history: list[dict] = (),
    ):
        """``history``: the records of earlier epochs (a resumed run's metrics)."""
        self.baseline_epochs, self.window = baseline_epochs, window
        self.reward_rise, self.tolerance = reward_rise, tolerance
        self.history: list[dict] = list(history)

    def _mean(self, records: list[dict], key: str) -> float:
        return sum(r[key] for r in records) / len(records)

    def update(self, record: dict) -> list[str]:
        """Add one epoch's record; the reasons it is flagged (``[]``: not flagged)."""
        self.history.append(record)
        if len(self.history) <= self.baseline_epochs:
            return []
        base, recent = self.history[: self.baseline_epochs], self.history[-self.window :]
        spread = max(self._mean(base, "reward_std"), 1e-8)
        rise = (self._mean(recent, "reward_mean") - self._mean(base, "reward_mean")) / spread
        if rise <= self.reward_rise:
            return []
        reasons = []
        for name in STATISTICS:
            key = f"image_{name}"
            if key in record:
                before, now = self._mean(base, key), self._mean(recent, key)
                if abs(now - before) > self.tolerance:
                    reasons.append(f"{name} {before:.3f} -> {now:.3f}")
        for key in sorted({k for r in self.history for k in r if k.startswith("eval_")}):
            values = [r[key] for r in self.history if key in r]  # the latest one holds until the next
            first, now = values[0], values[-1]
            if first - now > self.tolerance * max(abs(first), 1e-8):
                reasons.append(f"{key} {first:.4g} -> {now:.4g}")
        if reasons:
            reasons.insert(0, f"reward +{rise:.2f} baseline std")
        return reasons


def start_monitor(config, run) -> HackingMonitor | None:
    """The run's :class:`~diffrl.monitor.HackingMonitor` (``monitor.enabled``), holding a resumed
    run's earlier records."""
    m = config.monitor
    if not m.enabled:
        return None
    metrics = run.dir / "metrics.jsonl"
    history = [r for r in read_jsonl(metrics) if r["epoch"] < run.epochs.start] if metrics.exists() else []
    return HackingMonitor(m.baseline_epochs, m.window, m.reward_rise, m.tolerance, history)


def watch(monitor, record: dict, traj, accelerator, label: str) -> bool:
    """Add the images' statistics (``image_<statistic>``, averaged over processes, so that every
    process takes the same decision) to the epoch's ``record`` and
    let ``monitor`` judge it; a flagged epoch gets ``hacking: 1`` and its reasons, and a warning."""
    if monitor is None:
        return False
    stats = image_statistics(traj.images, traj.prompts)
    means = accelerator.reduce(torch.tensor(list(stats.values()), device=accelerator.device), "mean")
    record.update({f"image_{k}": v for k, v in zip(stats, means.tolist())})  # the same on every process
    reasons = monitor.update(record)
    record["hacking"] = int(bool(reasons))
    if reasons:
        record["hacking_reasons"] = "; ".join(reasons)
        accelerator.print(f"{label}: WARNING possible reward hacking: {'; '.join(reasons)}", flush=True)
    return bool(reasons)


__all__ = ["STATISTICS", "HackingMonitor", "image_statistics", "start_monitor", "watch"]
