"""Run ``solverx serve`` as a per-user service: a LaunchAgent on macOS, a systemd --user unit on Linux."""

from solverx.launchd.control import (
    Host,
    ServiceError,
    ServiceStatus,
    install,
    logs,
    restart,
    start,
    status,
    stop,
    uninstall,
    unit_file,
)
from solverx.launchd.service import LABEL, UNIT_NAME, ServiceSpec, build_spec, render_plist, render_systemd_unit

__all__ = [
    "LABEL",
    "UNIT_NAME",
    "Host",
    "ServiceError",
    "ServiceSpec",
    "ServiceStatus",
    "build_spec",
    "install",
    "logs",
    "render_plist",
    "render_systemd_unit",
    "restart",
    "start",
    "status",
    "stop",
    "uninstall",
    "unit_file",
]
