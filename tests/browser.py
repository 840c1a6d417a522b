"""Headless Chromium for tests: found on the PATH, or installed with apt (Debian's package, as
ENVIRONMENT.md describes); a test skips with the reason when neither works."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be installed here (needs root + apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:  # stale or missing package lists: refresh once, then retry
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)
        done = subprocess.run(install, capture_output=True, text=True, timeout=600, env=env)
    found = shutil.which("chromium")
    if done.returncode != 0 or not found:
        pytest.skip(f"installing Chromium failed: {done.stderr[-500:]}")
    return found


def run(url: str, *args: str, timeout: float = 60) -> str:
    """Chromium on ``url`` with ``args`` (e.g. --dump-dom); its stdout."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-1000:]}")
    return done.stdout


def screenshot(url: str, path: Path, size: str = "1200,2400") -> Path:
    run(url, f"--screenshot={path}", f"--window-size={size}")
    return path
