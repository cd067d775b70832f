"""The Linux backend: a ``systemd --user`` unit, driven by ``systemctl --user``; logs in the journal."""

from __future__ import annotations

import getpass
from pathlib import Path

from solverx.launchd.backend import ServiceBackend, ServiceStatus, run, write_atomic
from solverx.launchd.service import render_systemd_unit


def systemctl(*args: str) -> list[str]:
    return ["systemctl", "--user", *args]


class SystemdUserUnit(ServiceBackend):
    @property
    def unit_file(self) -> Path:
        return self.host.unit_dir / self.spec.unit_name

    def install(self) -> str:
        self.make_directories()
        write_atomic(self.unit_file, render_systemd_unit(self.spec).encode())
        run(systemctl("daemon-reload"))
        run(systemctl("enable", self.spec.unit_name))
        run(systemctl("restart", self.spec.unit_name))  # starts it, or restarts it on the new unit when reinstalling
        logs_hint = f"logs: journalctl --user -u {self.spec.unit_name}"
        return f"installed {self.unit_file}\nstarted {self.spec.unit_name}; {logs_hint}{_linger_note()}"

    def uninstall(self) -> str:
        if not self.unit_file.exists():
            return f"{self.spec.unit_name} is not installed"
        run(systemctl("disable", "--now", self.spec.unit_name))
        self.unit_file.unlink()
        run(systemctl("daemon-reload"))
        return f"stopped {self.spec.unit_name} and removed {self.unit_file}"

    def start(self) -> str:
        self.require_installed()
        run(systemctl("start", self.spec.unit_name))
        return f"started {self.spec.unit_name}"

    def stop(self) -> str:
        self.require_installed()
        run(systemctl("stop", self.spec.unit_name))
        return f"stopped {self.spec.unit_name}"

    def restart(self) -> str:
        self.require_installed()
        run(systemctl("restart", self.spec.unit_name))
        return f"restarted {self.spec.unit_name}"

    def status(self) -> ServiceStatus:
        # systemctl status exits 0 when active, 3 when inactive, 4 when the unit is unknown.
        result = run(systemctl("status", "--no-pager", self.spec.unit_name), check=False)
        detail = (result.stdout + result.stderr).strip()
        return ServiceStatus(self.unit_file.exists(), result.returncode == 0, self.unit_file, detail)

    def log_command(self, lines: int, follow: bool) -> list[str]:
        argv = ["journalctl", "--user", "-u", self.spec.unit_name, "-n", str(lines), "--no-pager"]
        return argv + (["-f"] if follow else [])


def _linger_note() -> str:
    """systemd stops user services at logout unless lingering is enabled; say so once, at install time."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        return ""
    if Path("/var/lib/systemd/linger", user).exists():
        return ""
    return f"\nnote: it stops when you log out; to keep it running: sudo loginctl enable-linger {user}"
