"""What a per-user service manager does for us, as one interface with a backend per platform.

:class:`ServiceBackend` has the verbs (install, uninstall, start, stop, restart, status, logs); ``launchagent``
drives launchd on macOS, ``systemd`` drives ``systemctl --user`` on Linux. Every step shells out to the platform's
tool and turns a failure into a :class:`ServiceError` whose message (command, exit code, the tool's own stderr) is
printed to the user as is.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from solverx.launchd.service import ServiceSpec

COMMAND_TIMEOUT_S = 60
_MISSING_HINTS = {
    "launchctl": "LaunchAgents need macOS",
    "systemctl": "the Linux service needs systemd (systemctl --user)",
    "journalctl": "the Linux service logs to the systemd journal",
}
_FAILURE_HINTS = {
    "Failed to connect to bus": "no systemd user session is running; log in through a real session "
    "or run `loginctl enable-linger $USER` as an administrator",
}


class ServiceError(Exception):
    """A service-manager step failed; the message says what ran and what it said, ready to show the user."""


@dataclass(frozen=True)
class Host:
    """Which service manager to drive and where its per-user unit files live (injectable for tests)."""

    platform: str
    unit_dir: Path
    uid: int

    @classmethod
    def current(cls, platform: str = sys.platform) -> Host:
        if platform == "darwin":
            unit_dir = Path.home() / "Library" / "LaunchAgents"
        elif platform == "linux":
            config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            unit_dir = Path(config_home) / "systemd" / "user"
        else:
            raise ServiceError(f"running as a service is supported on macOS and Linux, not {platform}")
        return cls(platform=platform, unit_dir=unit_dir, uid=os.getuid())


@dataclass(frozen=True)
class ServiceStatus:
    """What the service manager reports: whether the unit file exists, whether it runs, and its own words."""

    installed: bool
    running: bool
    unit_file: Path
    detail: str


class ServiceBackend(ABC):
    """One platform's service manager, for one service."""

    def __init__(self, spec: ServiceSpec, host: Host) -> None:
        self.spec, self.host = spec, host

    @property
    @abstractmethod
    def unit_file(self) -> Path:
        """Where the plist or unit file lives."""

    @abstractmethod
    def install(self) -> str:
        """Write the unit and (re)load it: it runs now and at every login; reinstalling applies changes."""

    @abstractmethod
    def uninstall(self) -> str:
        """Stop the service and remove its unit, so it no longer starts at login."""

    @abstractmethod
    def start(self) -> str: ...

    @abstractmethod
    def stop(self) -> str: ...

    @abstractmethod
    def restart(self) -> str: ...

    @abstractmethod
    def status(self) -> ServiceStatus:
        """The service manager's view; never raises for a stopped or missing service."""

    @abstractmethod
    def log_command(self, lines: int, follow: bool) -> list[str]:
        """The command that prints the service's recent output (and follows it)."""

    def require_installed(self) -> Path:
        if not self.unit_file.exists():
            raise ServiceError(
                f"the service is not installed ({self.unit_file} is missing); run `solverx service install`"
            )
        return self.unit_file

    def make_directories(self) -> None:
        for directory in (self.spec.working_directory, self.spec.log_directory, self.host.unit_dir):
            Path(directory).mkdir(parents=True, exist_ok=True)


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a service-manager command, capturing its output; a failure becomes a readable ServiceError."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ServiceError(missing_message(argv[0])) from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish within {COMMAND_TIMEOUT_S} s") from None
    if check and result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip() or "(no output)").replace("\n", "\n  ")
        message = f"`{shlex.join(argv)}` failed with exit code {result.returncode}:\n  {said}"
        hints = [hint for needle, hint in _FAILURE_HINTS.items() if needle in result.stderr]
        raise ServiceError("\n".join([message, *hints]))
    return result


def missing_message(program: str) -> str:
    hint = _MISSING_HINTS.get(program)
    return f"`{program}` was not found on PATH" + (f"; {hint}" if hint else "")


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
