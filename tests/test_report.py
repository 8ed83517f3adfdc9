"""report.html: chart coordinates against the data, and a real run's page rendered in headless
Chromium (images load, one chart per logged metric, the config shown)."""

import pytest
from playwright.sync_api import sync_playwright

from diffrl import cli
from diffrl.files import read_jsonl
from diffrl.report import CHART_H, CHART_W, PAD, chart_points, charts
from tests.browser import launch, needs_chromium
from tests.test_trainer import FAST, TINY


def test_chart_points_put_the_lowest_value_at_the_bottom_and_the_highest_at_the_top():
    points = chart_points([2.0, 5.0, 3.5], low=2.0, high=5.0)
    assert points == [(PAD, CHART_H - PAD), ((CHART_W) / 2, PAD), (CHART_W - PAD, (CHART_H) / 2)]


def test_charts_draw_the_logged_metrics_with_the_reward_spread():
    records = [
        {"epoch": 0, "reward_mean": 0.5, "reward_std": 0.1, "approx_kl": 0.0, "loss": float("nan")},
        {"epoch": 1, "reward_mean": 0.7, "reward_std": 0.2, "approx_kl": 1e-4},
    ]
    svgs = charts(records)
    assert [s.split('data-metric="')[1].split('"')[0] for s in svgs] == ["reward (mean ± std)", "approx_kl"]
    band = svgs[0].split('class="band" points="')[1].split('"')[0].split()
    assert len(band) == 4  # upper then lower edge of the ±std band, two epochs each
    # the band spans [0.5 - 0.1, 0.7 + 0.2]: its upper edge at epoch 1 is the top of the plot
    assert band[1] == f"{CHART_W - PAD:.1f},{PAD:.1f}" and band[3] == f"{PAD:.1f},{CHART_H - PAD:.1f}"


@pytest.mark.slow
@needs_chromium
def test_a_run_writes_a_report_that_renders_with_its_images(tmp_path):
    args = [*FAST, "run.num_epochs=2", f"run.output_dir={tmp_path}", "run.name=r"]
    assert cli.main(["train", TINY, *args]) == 0
    run = tmp_path / "r"
    assert {p.name for p in (run / "samples").glob("*.png")} >= {"before.png", "middle.png", "after.png"}
    (run / "report.html").unlink()
    assert cli.main(["report", str(run)]) == 0  # regenerates it
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto((run / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
            metrics = page.evaluate("[...document.querySelectorAll('svg.chart')].map(s => s.dataset.metric)")
            points = page.evaluate("document.querySelector('svg.chart polyline').getAttribute('points')")
            config = page.text_content("#config")
        finally:
            browser.close()
    assert [src for src, _ in images] == ["samples/before.png", "samples/middle.png", "samples/after.png"]
    assert all(width > 0 for _, width in images), images  # every grid loaded
    assert metrics == [
        "reward (mean ± std)",
        "approx_kl",
        "clipfrac",
        "loss",
        "image saturation",
        "image diversity",
        "image high-frequency energy",
    ]
    assert len(points.split()) == len(read_jsonl(run / "metrics.jsonl")) == 2
    assert "reward:" in config and "name: jpeg_compressibility" in config
