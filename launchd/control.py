"""Install, start, stop, restart, inspect and remove the service with the platform's own service manager.

Each verb picks the backend for the host (:func:`backend`: a LaunchAgent on macOS, a ``systemd --user`` unit on
Linux, both :class:`~solverx.launchd.backend.ServiceBackend`) and runs it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from solverx.launchd.backend import Host, ServiceBackend, ServiceError, ServiceStatus, missing_message
from solverx.launchd.launchagent import LaunchAgent
from solverx.launchd.service import ServiceSpec
from solverx.launchd.systemd import SystemdUserUnit

__all__ = [
    "Host", "ServiceError", "ServiceStatus", "backend", "install", "logs", "restart", "start", "status", "stop",
    "uninstall", "unit_file",
]  # fmt: skip

BACKENDS: dict[str, type[ServiceBackend]] = {"darwin": LaunchAgent, "linux": SystemdUserUnit}


def backend(spec: ServiceSpec, host: Host | None = None) -> ServiceBackend:
    """The service manager of ``host`` (default: this machine) for ``spec``."""
    host = host or Host.current()
    try:
        return BACKENDS[host.platform](spec, host)
    except KeyError:
        raise ServiceError(f"running as a service is supported on macOS and Linux, not {host.platform}") from None


def unit_file(spec: ServiceSpec, host: Host) -> Path:
    """Where the plist or unit for ``spec`` lives on ``host``."""
    return backend(spec, host).unit_file


def install(spec: ServiceSpec, host: Host | None = None) -> str:
    """Write the plist/unit and (re)load it: it runs now and at every login; reinstalling applies changes."""
    return backend(spec, host).install()


def uninstall(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop the service and remove its plist/unit, so it no longer starts at login."""
    return backend(spec, host).uninstall()


def start(spec: ServiceSpec, host: Host | None = None) -> str:
    """Start the installed service (it stays installed; it also starts at the next login)."""
    return backend(spec, host).start()


def stop(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop the service until the next ``start`` or login; it stays installed."""
    return backend(spec, host).stop()


def restart(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop and start the service (e.g. after changing the config file); starts it if it was stopped."""
    return backend(spec, host).restart()


def status(spec: ServiceSpec, host: Host | None = None) -> ServiceStatus:
    """The service manager's view of the service; never raises for a stopped or missing service."""
    return backend(spec, host).status()


def logs(spec: ServiceSpec, host: Host | None = None, *, lines: int = 100, follow: bool = False) -> int:
    """Print the service's recent output to this terminal (and keep following it); returns the exit code."""
    argv = backend(spec, host).log_command(lines, follow)
    try:
        return subprocess.run(argv, check=False).returncode
    except FileNotFoundError:
        raise ServiceError(missing_message(argv[0])) from None
    except KeyboardInterrupt:
        return 0
