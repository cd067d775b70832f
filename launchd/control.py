"""Install, start, stop, restart, inspect and remove the service with the platform's own service manager.

macOS: a LaunchAgent driven by ``launchctl`` in the user's GUI domain. Linux: a ``systemd --user`` unit
driven by ``systemctl --user``. Every step shells out to those tools and turns a failure into a
:class:`ServiceError` whose message (command, exit code, the tool's own stderr) is printed to the user as is.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launchd.service import ServiceSpec, render_plist, render_systemd_unit

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


def unit_file(spec: ServiceSpec, host: Host) -> Path:
    """Where the plist or unit for ``spec`` lives on ``host``."""
    name = f"{spec.label}.plist" if host.platform == "darwin" else spec.unit_name
    return host.unit_dir / name


def install(spec: ServiceSpec, host: Host | None = None) -> str:
    """Write the plist/unit and (re)load it: it runs now and at every login; reinstalling applies changes."""
    host = host or Host.current()
    for directory in (spec.working_directory, spec.log_directory, host.unit_dir):
        Path(directory).mkdir(parents=True, exist_ok=True)
    path = unit_file(spec, host)
    if host.platform == "darwin":
        _write_atomic(path, render_plist(spec))
        was_loaded = _launchd_loaded(spec, host)
        if was_loaded:
            _run(["launchctl", "bootout", _launchd_target(spec, host)])
        _launchd_bootstrap(path, host, retry=was_loaded)
        return f"installed {path}\nstarted {spec.label}; logs in {spec.log_directory}"
    _write_atomic(path, render_systemd_unit(spec).encode())
    _run(_systemctl("daemon-reload"))
    _run(_systemctl("enable", spec.unit_name))
    _run(_systemctl("restart", spec.unit_name))  # starts it, or restarts it on the new unit when reinstalling
    logs_hint = f"logs: journalctl --user -u {spec.unit_name}"
    return f"installed {path}\nstarted {spec.unit_name}; {logs_hint}{_linger_note()}"


def uninstall(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop the service and remove its plist/unit, so it no longer starts at login."""
    host = host or Host.current()
    path = unit_file(spec, host)
    if host.platform == "darwin":
        if _launchd_loaded(spec, host):
            _run(["launchctl", "bootout", _launchd_target(spec, host)])
        elif not path.exists():
            return f"{spec.label} is not installed"
        path.unlink(missing_ok=True)
        return f"stopped {spec.label} and removed {path}"
    if not path.exists():
        return f"{spec.unit_name} is not installed"
    _run(_systemctl("disable", "--now", spec.unit_name))
    path.unlink()
    _run(_systemctl("daemon-reload"))
    return f"stopped {spec.unit_name} and removed {path}"


def start(spec: ServiceSpec, host: Host | None = None) -> str:
    """Start the installed service (it stays installed; it also starts at the next login)."""
    host = host or Host.current()
    path = _require_installed(spec, host)
    if host.platform == "darwin":
        if _launchd_loaded(spec, host):
            _run(["launchctl", "kickstart", _launchd_target(spec, host)])
        else:
            _launchd_bootstrap(path, host)
        return f"started {spec.label}"
    _run(_systemctl("start", spec.unit_name))
    return f"started {spec.unit_name}"


def stop(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop the service until the next ``start`` or login; it stays installed."""
    host = host or Host.current()
    _require_installed(spec, host)
    if host.platform == "darwin":
        if not _launchd_loaded(spec, host):
            return f"{spec.label} is not running"
        _run(["launchctl", "bootout", _launchd_target(spec, host)])
        return f"stopped {spec.label}"
    _run(_systemctl("stop", spec.unit_name))
    return f"stopped {spec.unit_name}"


def restart(spec: ServiceSpec, host: Host | None = None) -> str:
    """Stop and start the service (e.g. after changing the config file); starts it if it was stopped."""
    host = host or Host.current()
    path = _require_installed(spec, host)
    if host.platform == "darwin":
        if _launchd_loaded(spec, host):
            _run(["launchctl", "kickstart", "-k", _launchd_target(spec, host)])
        else:
            _launchd_bootstrap(path, host)
        return f"restarted {spec.label}"
    _run(_systemctl("restart", spec.unit_name))
    return f"restarted {spec.unit_name}"


def status(spec: ServiceSpec, host: Host | None = None) -> ServiceStatus:
    """The service manager's view of the service; never raises for a stopped or missing service."""
    host = host or Host.current()
    path = unit_file(spec, host)
    if host.platform == "darwin":
        result = _run(["launchctl", "print", _launchd_target(spec, host)], check=False)
        running = result.returncode == 0 and "state = running" in result.stdout
        detail = result.stdout if result.returncode == 0 else f"{spec.label} is not loaded"
        return ServiceStatus(installed=path.exists(), running=running, unit_file=path, detail=detail.strip())
    # systemctl status exits 0 when active, 3 when inactive, 4 when the unit is unknown.
    result = _run(_systemctl("status", "--no-pager", spec.unit_name), check=False)
    detail = (result.stdout + result.stderr).strip()
    running = result.returncode == 0
    return ServiceStatus(installed=path.exists(), running=running, unit_file=path, detail=detail)


def logs(spec: ServiceSpec, host: Host | None = None, *, lines: int = 100, follow: bool = False) -> int:
    """Print the service's recent output to this terminal (and keep following it); returns the exit code."""
    host = host or Host.current()
    if host.platform == "darwin":
        files = [str(p) for p in (spec.stdout_path, spec.stderr_path) if p.exists()]
        if not files:
            raise ServiceError(f"no logs yet in {spec.log_directory}")
        argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), *files]
    else:
        argv = ["journalctl", "--user", "-u", spec.unit_name, "-n", str(lines), "--no-pager"]
        argv += ["-f"] if follow else []
    try:
        return subprocess.run(argv, check=False).returncode
    except FileNotFoundError:
        raise ServiceError(_missing_message(argv[0])) from None
    except KeyboardInterrupt:
        return 0


def _require_installed(spec: ServiceSpec, host: Host) -> Path:
    path = unit_file(spec, host)
    if not path.exists():
        raise ServiceError(f"the service is not installed ({path} is missing); run `solverx service install`")
    return path


def _launchd_target(spec: ServiceSpec, host: Host) -> str:
    return f"gui/{host.uid}/{spec.label}"


def _launchd_loaded(spec: ServiceSpec, host: Host) -> bool:
    return _run(["launchctl", "print", _launchd_target(spec, host)], check=False).returncode == 0


def _launchd_bootstrap(path: Path, host: Host, *, retry: bool = False) -> None:
    """``launchctl bootstrap``; right after a bootout launchd may still be tearing down: retry briefly."""
    attempts = 3 if retry else 1
    for attempt in range(attempts):
        try:
            _run(["launchctl", "bootstrap", f"gui/{host.uid}", str(path)])
            return
        except ServiceError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def _systemctl(*args: str) -> list[str]:
    return ["systemctl", "--user", *args]


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a service-manager command, capturing its output; a failure becomes a readable ServiceError."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ServiceError(_missing_message(argv[0])) from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish within {COMMAND_TIMEOUT_S} s") from None
    if check and result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip() or "(no output)").replace("\n", "\n  ")
        message = f"`{shlex.join(argv)}` failed with exit code {result.returncode}:\n  {said}"
        hints = [hint for needle, hint in _FAILURE_HINTS.items() if needle in result.stderr]
        raise ServiceError("\n".join([message, *hints]))
    return result


def _missing_message(program: str) -> str:
    hint = _MISSING_HINTS.get(program)
    return f"`{program}` was not found on PATH" + (f"; {hint}" if hint else "")


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _linger_note() -> str:
    """systemd stops user services at logout unless lingering is enabled; say so once, at install time."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        return ""
    if Path("/var/lib/systemd/linger", user).exists():
        return ""
    return f"\nnote: it stops when you log out; to keep it running: sudo loginctl enable-linger {user}"
