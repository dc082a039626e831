"""Debian's chromium driven by Playwright: how the browser tests find and start it."""

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")


def launch_chromium(playwright):
    # --no-sandbox: the tests run as root, and chromium's sandbox refuses root.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
