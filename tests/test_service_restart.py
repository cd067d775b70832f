"""A real service manager brings the daemon back after a crash (kill -9).

Needs a running ``systemd --user`` (a desktop session, or ``loginctl enable-linger``); skipped elsewhere — this
container's PID 1 is not systemd, so here the unit is only checked by tests/test_service.py (rendering, invocations,
systemd-analyze). The test installs a uniquely named unit and always uninstalls it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from serving import free_port, link_model

from solverx import launchd


def _user_systemd_running() -> bool:
    if sys.platform != "linux" or shutil.which("systemctl") is None:
        return False
    probe = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True, text=True)
    return probe.stdout.strip() in ("running", "degraded")


def _main_pid(unit: str) -> int:
    shown = subprocess.run(
        ["systemctl", "--user", "show", "--property=MainPID", "--value", unit], capture_output=True, text=True
    )
    return int(shown.stdout.strip() or 0)


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up within {timeout:.0f} s")


@pytest.mark.skipif(not _user_systemd_running(), reason="needs a running systemd --user instance")
def test_systemd_restarts_the_daemon_after_sigkill(tiny_model_dir: Path, tmp_path: Path):
    home = tmp_path / "home"
    link_model(home, tiny_model_dir)
    port = free_port()
    spec = launchd.build_spec(home, serve_args=("--port", str(port), "--train-debounce-seconds", "3600"))
    spec = dataclasses.replace(spec, unit_name=f"solverx-test-{uuid.uuid4().hex[:8]}.service", throttle_interval=1)
    url = f"http://127.0.0.1:{port}"
    try:
        launchd.install(spec)
        _wait_healthy(url, 120)
        first = _main_pid(spec.unit_name)
        assert first > 0
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _main_pid(spec.unit_name) in (0, first):
            assert time.monotonic() < deadline, "systemd did not restart the daemon"
            time.sleep(0.3)
        _wait_healthy(url, 120)
    finally:
        launchd.uninstall(spec)
