"""The macOS backend: a LaunchAgent in the user's GUI domain, driven by ``launchctl``."""

from __future__ import annotations

import time
from pathlib import Path

from solverx.launchd.backend import ServiceBackend, ServiceError, ServiceStatus, run, write_atomic
from solverx.launchd.service import render_plist


class LaunchAgent(ServiceBackend):
    @property
    def unit_file(self) -> Path:
        return self.host.unit_dir / f"{self.spec.label}.plist"

    @property
    def target(self) -> str:
        return f"gui/{self.host.uid}/{self.spec.label}"

    def loaded(self) -> bool:
        return run(["launchctl", "print", self.target], check=False).returncode == 0

    def bootstrap(self, *, retry: bool = False) -> None:
        """``launchctl bootstrap``; right after a bootout launchd may still be tearing down: retry briefly."""
        attempts = 3 if retry else 1
        for attempt in range(attempts):
            try:
                run(["launchctl", "bootstrap", f"gui/{self.host.uid}", str(self.unit_file)])
                return
            except ServiceError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)

    def install(self) -> str:
        self.make_directories()
        write_atomic(self.unit_file, render_plist(self.spec))
        was_loaded = self.loaded()
        if was_loaded:
            run(["launchctl", "bootout", self.target])
        self.bootstrap(retry=was_loaded)
        return f"installed {self.unit_file}\nstarted {self.spec.label}; logs in {self.spec.log_directory}"

    def uninstall(self) -> str:
        if self.loaded():
            run(["launchctl", "bootout", self.target])
        elif not self.unit_file.exists():
            return f"{self.spec.label} is not installed"
        self.unit_file.unlink(missing_ok=True)
        return f"stopped {self.spec.label} and removed {self.unit_file}"

    def start(self) -> str:
        self.require_installed()
        if self.loaded():
            run(["launchctl", "kickstart", self.target])
        else:
            self.bootstrap()
        return f"started {self.spec.label}"

    def stop(self) -> str:
        self.require_installed()
        if not self.loaded():
            return f"{self.spec.label} is not running"
        run(["launchctl", "bootout", self.target])
        return f"stopped {self.spec.label}"

    def restart(self) -> str:
        self.require_installed()
        if self.loaded():
            run(["launchctl", "kickstart", "-k", self.target])
        else:
            self.bootstrap()
        return f"restarted {self.spec.label}"

    def status(self) -> ServiceStatus:
        result = run(["launchctl", "print", self.target], check=False)
        running = result.returncode == 0 and "state = running" in result.stdout
        detail = result.stdout if result.returncode == 0 else f"{self.spec.label} is not loaded"
        return ServiceStatus(self.unit_file.exists(), running, self.unit_file, detail.strip())

    def log_command(self, lines: int, follow: bool) -> list[str]:
        files = [str(p) for p in (self.spec.stdout_path, self.spec.stderr_path) if p.exists()]
        if not files:
            raise ServiceError(f"no logs yet in {self.spec.log_directory}")
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), *files]
