"""``report.html``: one page per run folder, written after every epoch and by ``diffrl report RUN_DIR``.

It shows the reward curve with its spread (mean ± standard deviation over the epoch's samples),
approx_kl and clipfrac (or, for Diffusion-DPO/SePPO, the loss and implicit accuracy), the
reward-hacking monitor's image statistics and flagged epochs (:mod:`diffrl.monitor`), the sample
grids of the fixed seeded prompts before training, at the middle epoch and after training side by
side, and the resolved ``config.yaml``. Charts are inline SVG; images are linked relative to the
run folder, so the page works wherever the folder is copied.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from diffrl.files import atomic_write_bytes, read_jsonl

CHART_W, CHART_H, PAD = 480, 240, 40
CHARTS = (
    ("reward_mean", "reward_std", "reward (mean ± std)"),
    ("approx_kl", None, "approx_kl"),
    ("clipfrac", None, "clipfrac"),
    ("loss", None, "loss"),
    ("accuracy", None, "implicit accuracy"),
    ("image_saturation", None, "image saturation"),
    ("image_diversity", None, "image diversity"),
    ("image_high_freq", None, "image high-frequency energy"),
)
"""(metric, its spread or None, title) of each chart, drawn when the run logged the metric."""
GRIDS = (("before.png", "before training"), ("middle.png", "middle epoch"), ("after.png", "after training"))


def chart_points(values: list[float], low: float, high: float) -> list[tuple[float, float]]:
    """SVG coordinates of ``values`` (x: epoch index across the plot, y: value, up is higher)."""
    span = (high - low) or 1.0
    step = (CHART_W - 2 * PAD) / max(1, len(values) - 1)
    return [
        (round(PAD + i * step, 2), round(CHART_H - PAD - (v - low) / span * (CHART_H - 2 * PAD), 2))
        for i, v in enumerate(values)
    ]


def svg_chart(epochs: list[int], values: list[float], spread: list[float] | None, title: str) -> str:
    """An SVG line chart of ``values`` per epoch with an optional ± ``spread`` band."""
    lows = [v - s for v, s in zip(values, spread)] if spread else values
    highs = [v + s for v, s in zip(values, spread)] if spread else values
    low, high = min(lows), max(highs)
    line = " ".join(f"{x},{y}" for x, y in chart_points(values, low, high))
    band = ""
    if spread:
        upper, lower = chart_points(highs, low, high), chart_points(lows, low, high)
        outline = " ".join(f"{x},{y}" for x, y in upper + lower[::-1])
        band = f'<polygon class="band" points="{outline}" fill="#9ecae1" fill-opacity="0.5"/>'
    return (
        f'<svg class="chart" data-metric="{html.escape(title)}" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{PAD}" y="20" font-size="14">{html.escape(title)}</text>'
        f'<rect x="{PAD}" y="{PAD}" width="{CHART_W - 2 * PAD}" height="{CHART_H - 2 * PAD}" fill="none" stroke="#888"/>'
        f"{band}"
        f'<polyline class="line" points="{line}" fill="none" stroke="#08519c" stroke-width="2"/>'
        f'<text x="2" y="{PAD + 4}" font-size="11">{high:.3g}</text>'
        f'<text x="2" y="{CHART_H - PAD}" font-size="11">{low:.3g}</text>'
        f'<text x="{CHART_W // 2 - 40}" y="{CHART_H - 12}" font-size="11">epoch {epochs[0]}..{epochs[-1]}</text>'
        "</svg>"
    )


def charts(records: list[dict]) -> list[str]:
    """The SVG charts of every metric in :data:`CHARTS` that the records carry (finite values)."""
    out = []
    for key, spread_key, title in CHARTS:
        rows = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not rows:
            continue
        spread = [r.get(spread_key) or 0.0 for r in rows] if spread_key else None
        out.append(svg_chart([r["epoch"] for r in rows], [r[key] for r in rows], spread, title))
    return out


def hacking_section(records: list[dict]) -> str:
    """The reward-hacking monitor's flagged epochs (:mod:`diffrl.monitor`) as a list, or a line
    saying none was flagged; empty for runs without the monitor."""
    if not any("hacking" in r for r in records):
        return ""
    flagged = [r for r in records if r.get("hacking")]
    if not flagged:
        return '<h2>Reward-hacking monitor</h2><p id="hacking">no epoch flagged</p>'
    items = "".join(
        f"<li>epoch {r['epoch']}: {html.escape(str(r.get('hacking_reasons', '')))}</li>" for r in flagged
    )
    return f'<h2>Reward-hacking monitor</h2><ul id="hacking" class="warning">{items}</ul>'


def write_report(run_dir: str | Path) -> Path:
    """Write (atomically) and return ``run_dir/report.html`` from the folder's metrics.jsonl,
    sample grids and config.yaml."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    config = (
        (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    )
    grids = [
        f'<figure><img src="samples/{name}" alt="{label}"><figcaption>{label}</figcaption></figure>'
        for name, label in GRIDS
        if (run_dir / "samples" / name).is_file()
    ]
    last = records[-1] if records else {}
    summary = ", ".join(
        f"{k} {last[k]:.4g}"
        for k in ("reward_mean", "approx_kl", "clipfrac", "loss", "accuracy")
        if isinstance(last.get(k), (int, float))
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffrl report: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
.charts, .grids {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ margin: 0; }} figure img {{ max-width: 420px; image-rendering: pixelated; border: 1px solid #ccc; }}
pre {{ background: #f4f4f4; padding: 1rem; overflow-x: auto; }}
.warning {{ color: #a50f15; }}
</style></head><body>
<h1>{html.escape(run_dir.name)}</h1>
<p>{len(records)} epochs logged{"; last: " + html.escape(summary) if summary else ""}.</p>
<h2>Training curves</h2>
<div class="charts">{"".join(charts(records)) or "<p>no epochs yet</p>"}</div>
{hacking_section(records)}
<h2>Samples: fixed prompts and seed</h2>
<div class="grids">{"".join(grids) or "<p>no sample grids yet</p>"}</div>
<h2>Config</h2>
<pre id="config">{html.escape(config)}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
