"""The service description renders to a valid plist and systemd unit, and the service commands drive
launchctl/systemctl exactly as intended (checked against stand-in executables that record their arguments)."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from solverx.blas import find_openblas
from solverx.launchd import control
from solverx.launchd.control import Host, ServiceError
from solverx.launchd.service import (
    EXAMPLE_FILES,
    LABEL,
    ServiceSpec,
    build_spec,
    render_example,
    render_plist,
    render_systemd_unit,
)

STANDIN = """#!/bin/sh
# Records its argv (tab-separated) and answers as configured by <name>.<subcommand>.{rc,stdout,stderr} files.
name=$(basename "$0")
{ printf '%s' "$name"; for arg in "$@"; do printf '\\t%s' "$arg"; done; echo; } >> "$STANDIN_DIR/calls.log"
sub=""
for arg in "$@"; do case "$arg" in -*) ;; *) sub=$arg; break;; esac; done
base="$STANDIN_DIR/$name.$sub"
[ -f "$base.stdout" ] && cat "$base.stdout"
[ -f "$base.stderr" ] && cat "$base.stderr" >&2
[ -f "$base.rc" ] && exit "$(cat "$base.rc")"
exit 0
"""


class StandIns:
    """Fake launchctl/systemctl/journalctl first on PATH; ``calls()`` returns what they were asked to do."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        for name in ("launchctl", "systemctl", "journalctl"):
            script = directory / name
            script.write_text(STANDIN)
            script.chmod(0o755)

    def respond(self, name: str, sub: str, *, rc: int = 0, stdout: str = "", stderr: str = "") -> None:
        base = self.directory / f"{name}.{sub}"
        base.with_name(base.name + ".rc").write_text(str(rc))
        base.with_name(base.name + ".stdout").write_text(stdout)
        base.with_name(base.name + ".stderr").write_text(stderr)

    def calls(self) -> list[list[str]]:
        log = self.directory / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return [line.split("\t") for line in lines]


@pytest.fixture
def standins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIns:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("STANDIN_DIR", str(directory))
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return StandIns(directory)


@pytest.fixture
def spec(tmp_path: Path) -> ServiceSpec:
    return build_spec(tmp_path / "state home", serve_args=("--port", "8181"), platform=sys.platform)


# --- rendering ---


def test_plist_round_trips_with_every_key_and_type(spec: ServiceSpec) -> None:
    plist = plistlib.loads(render_plist(spec))

    assert set(plist) == {
        "Label",
        "ProgramArguments",
        "RunAtLoad",
        "KeepAlive",
        "ThrottleInterval",
        "ProcessType",
        "StandardOutPath",
        "StandardErrorPath",
        "EnvironmentVariables",
        "WorkingDirectory",
    }
    assert plist["Label"] == LABEL == "com.solverx.daemon"
    assert plist["ProgramArguments"] == list(spec.program_arguments)
    assert all(isinstance(arg, str) for arg in plist["ProgramArguments"])
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["KeepAlive"]["SuccessfulExit"] is False
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] > 0
    assert plist["ProcessType"] in {"Interactive", "Background", "Standard", "Adaptive"}
    logs = Path(spec.working_directory) / "logs"
    assert Path(plist["StandardOutPath"]).parent == logs
    assert Path(plist["StandardErrorPath"]).parent == logs
    assert plist["StandardOutPath"] != plist["StandardErrorPath"]
    assert plist["WorkingDirectory"] == str(spec.working_directory)
    env = plist["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["SOLVERX_HOME"] == str(spec.working_directory)
    assert {"/usr/bin", "/bin"} <= set(env["PATH"].split(":"))
    assert env["PATH"].split(":")[0] == os.path.dirname(spec.program_arguments[0])


def test_program_arguments_are_absolute_without_tilde(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = build_spec("~/solverx-state", platform="darwin")
    args = plistlib.loads(render_plist(spec))["ProgramArguments"]

    assert os.path.isabs(args[0]) and os.access(args[0], os.X_OK)
    assert args[1:4] == ["-m", "solverx", "serve"]
    assert args[args.index("--home") + 1] == str(tmp_path / "solverx-state")
    assert not any("~" in arg for arg in args)
    assert "LD_PRELOAD" not in spec.environment  # a macOS plist never carries the Linux preload

    with pytest.raises(ValueError, match="absolute"):
        ServiceSpec(("python", "-m", "solverx"), tmp_path, tmp_path / "logs")
    with pytest.raises(ValueError, match="~"):
        ServiceSpec(("/usr/bin/python3", "--home", "~/x"), tmp_path, tmp_path / "logs")


@pytest.mark.skipif(sys.platform != "linux" or find_openblas() is None, reason="needs Linux with OpenBLAS")
def test_linux_service_preloads_openblas(tmp_path: Path) -> None:
    spec = build_spec(tmp_path, platform="linux")
    assert find_openblas() in spec.environment["LD_PRELOAD"].split(":")
    assert f'"LD_PRELOAD={spec.environment["LD_PRELOAD"]}"' in render_systemd_unit(spec)


def _awkward_spec(tmp_path: Path) -> ServiceSpec:
    """Paths with spaces, quotes, ``%`` and ``$`` — everything a unit file would otherwise misread."""
    odd = tmp_path / "dir with space 100% $HOME"
    (odd / "bin").mkdir(parents=True)
    python = odd / "bin" / "python"
    python.symlink_to(sys.executable)
    state = odd / 'state "quoted" \\ back'
    return build_spec(state, python=str(python), serve_args=("--api-key", "a\\b$c'd"), platform="linux")


def test_systemd_unit_quotes_every_word(tmp_path: Path) -> None:
    spec = _awkward_spec(tmp_path)
    unit = render_systemd_unit(spec)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))

    program, *args = shlex.split(exec_start.removeprefix("ExecStart="))
    assert [program.replace("%%", "%"), *(w.replace("$$", "$").replace("%%", "%") for w in args)] == list(
        spec.program_arguments
    )
    with pytest.raises(ValueError, match="quotes or backslashes"):
        render_systemd_unit(build_spec(tmp_path, python='/opt/"odd"/python', platform="linux"))
    for key in ("Type=simple", "Restart=on-failure", "RestartSec=10", "WantedBy=default.target"):
        assert key in unit.splitlines()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    spec = _awkward_spec(tmp_path)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit = unit_dir / "solverx.service"
    unit.write_text(render_systemd_unit(spec))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}

    result = subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], capture_output=True, text=True, env=env)
    if "Failed to initialize manager" in result.stderr:  # no user manager possible here: verify offline
        result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # unknown keys or bad quoting only warn, so any output is a failure


@pytest.mark.parametrize("platform", sorted(EXAMPLE_FILES))
def test_checked_in_examples_are_current(platform: str) -> None:
    assert EXAMPLE_FILES[platform].read_bytes() == render_example(platform), (
        'regenerate with: python -c "import solverx.launchd.service as s; s.write_examples()"'
    )


# --- service commands against stand-in launchctl / systemctl ---


def test_macos_commands_issue_expected_launchctl_calls(standins: StandIns, spec: ServiceSpec, tmp_path: Path) -> None:
    host = Host(platform="darwin", unit_dir=tmp_path / "LaunchAgents", uid=501)
    plist = host.unit_dir / f"{LABEL}.plist"
    target = f"gui/501/{LABEL}"

    standins.respond("launchctl", "print", rc=113, stderr="Could not find service")
    control.install(spec, host)
    assert standins.calls() == [
        ["launchctl", "print", target],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
    ]
    assert plist.read_bytes() == render_plist(spec)
    assert Path(spec.log_directory).is_dir()

    standins.respond("launchctl", "print", stdout="\tstate = running\n\tpid = 4242\n")
    control.start(spec, host)
    assert standins.calls() == [["launchctl", "print", target], ["launchctl", "kickstart", target]]
    control.restart(spec, host)
    assert standins.calls() == [["launchctl", "print", target], ["launchctl", "kickstart", "-k", target]]
    state = control.status(spec, host)
    assert state.installed and state.running and "pid = 4242" in state.detail
    standins.calls()
    control.stop(spec, host)
    assert standins.calls() == [["launchctl", "print", target], ["launchctl", "bootout", target]]

    control.install(spec, host)  # reinstalling a loaded agent unloads it first
    assert standins.calls() == [
        ["launchctl", "print", target],
        ["launchctl", "bootout", target],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
    ]
    control.uninstall(spec, host)
    assert standins.calls() == [["launchctl", "print", target], ["launchctl", "bootout", target]]
    assert not plist.exists()


def test_macos_start_after_stop_bootstraps_again(standins: StandIns, spec: ServiceSpec, tmp_path: Path) -> None:
    host = Host(platform="darwin", unit_dir=tmp_path / "LaunchAgents", uid=501)
    standins.respond("launchctl", "print", rc=113)
    control.install(spec, host)
    standins.calls()

    assert control.stop(spec, host) == f"{LABEL} is not running"
    control.start(spec, host)
    assert standins.calls() == [
        ["launchctl", "print", f"gui/501/{LABEL}"],
        ["launchctl", "print", f"gui/501/{LABEL}"],
        ["launchctl", "bootstrap", "gui/501", str(host.unit_dir / f"{LABEL}.plist")],
    ]
    assert not control.status(spec, host).running


def test_linux_commands_issue_expected_systemctl_calls(standins: StandIns, spec: ServiceSpec, tmp_path: Path) -> None:
    host = Host(platform="linux", unit_dir=tmp_path / "systemd" / "user", uid=1000)
    unit = host.unit_dir / "solverx.service"
    user = ["systemctl", "--user"]

    control.install(spec, host)
    assert standins.calls() == [
        [*user, "daemon-reload"],
        [*user, "enable", "solverx.service"],
        [*user, "restart", "solverx.service"],
    ]
    assert unit.read_text() == render_systemd_unit(spec)

    control.start(spec, host)
    assert standins.calls() == [[*user, "start", "solverx.service"]]
    control.stop(spec, host)
    assert standins.calls() == [[*user, "stop", "solverx.service"]]
    control.restart(spec, host)
    assert standins.calls() == [[*user, "restart", "solverx.service"]]

    standins.respond("systemctl", "status", rc=3, stdout="○ solverx.service\n     Active: inactive (dead)\n")
    state = control.status(spec, host)
    assert state.installed and not state.running and "inactive" in state.detail
    assert standins.calls() == [[*user, "status", "--no-pager", "solverx.service"]]

    assert control.logs(spec, host, lines=20) == 0
    assert standins.calls() == [["journalctl", "--user", "-u", "solverx.service", "-n", "20", "--no-pager"]]

    control.uninstall(spec, host)
    assert standins.calls() == [[*user, "disable", "--now", "solverx.service"], [*user, "daemon-reload"]]
    assert not unit.exists()
    assert control.uninstall(spec, host) == "solverx.service is not installed"
    assert standins.calls() == []


def test_failing_service_manager_gives_clear_message(standins: StandIns, spec: ServiceSpec, tmp_path: Path) -> None:
    linux = Host(platform="linux", unit_dir=tmp_path / "user", uid=1000)
    standins.respond("systemctl", "daemon-reload", rc=1, stderr="Failed to connect to bus: No medium found\n")
    with pytest.raises(ServiceError) as error:
        control.install(spec, linux)
    message = str(error.value)
    assert "`systemctl --user daemon-reload` failed with exit code 1" in message
    assert "Failed to connect to bus: No medium found" in message
    assert "loginctl enable-linger" in message
    assert standins.calls() == [["systemctl", "--user", "daemon-reload"]]  # stops at the first failure

    mac = Host(platform="darwin", unit_dir=tmp_path / "agents", uid=501)
    standins.respond("launchctl", "print", rc=113)
    standins.respond("launchctl", "bootstrap", rc=5, stderr="Bootstrap failed: 5: Input/output error\n")
    with pytest.raises(ServiceError, match=r"exit code 5:\n  Bootstrap failed: 5: Input/output error"):
        control.install(spec, mac)


def test_missing_tool_or_unit_gives_clear_message(
    spec: ServiceSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    linux = Host(platform="linux", unit_dir=tmp_path / "user", uid=1000)

    with pytest.raises(ServiceError, match=r"^`systemctl` was not found on PATH; .*systemd"):
        control.install(spec, linux)
    with pytest.raises(ServiceError, match="`launchctl` was not found on PATH; LaunchAgents need macOS"):
        control.status(spec, Host(platform="darwin", unit_dir=tmp_path / "agents", uid=501))
    with pytest.raises(ServiceError, match=r"not installed .*run `solverx service install`"):
        control.start(spec, Host(platform="linux", unit_dir=tmp_path / "nowhere", uid=1000))
    with pytest.raises(ServiceError, match="supported on macOS and Linux"):
        Host.current("win32")


def test_macos_logs_tail_the_log_files(spec: ServiceSpec, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    host = Host(platform="darwin", unit_dir=tmp_path / "agents", uid=501)
    with pytest.raises(ServiceError, match="no logs yet"):
        control.logs(spec, host)
    spec.log_directory.mkdir(parents=True)
    spec.stdout_path.write_text("".join(f"line {i}\n" for i in range(10)))
    spec.stderr_path.write_text("boom\n")

    assert control.logs(spec, host, lines=2) == 0
    out = capfd.readouterr().out
    assert "line 8\nline 9\n" in out and "line 7" not in out and "boom" in out
