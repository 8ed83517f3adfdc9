"""Headless Chromium for the page tests: Debian's /usr/bin/chromium driven by Playwright (no
browser download). Without it the tests skip, unless DIFFRL_REQUIRE_BROWSER is set (.ci/run)."""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Without the background-networking flags Chromium keeps dialling out, which this network refuses."""

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("DIFFRL_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


def launch(playwright):
    """A headless Chromium browser from the system package."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
