"""One description of the background service, rendered as a launchd plist or a systemd --user unit.

Both files are generated from the same :class:`ServiceSpec` so the two platforms cannot drift apart: the same
program, arguments, environment, working directory and restart policy. Service managers start programs with a
minimal environment and no shell, so every path is absolute and the environment is spelled out.
"""

from __future__ import annotations

import os
import plistlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from solverx.blas import preload_env
from solverx.paths import HOME_ENV, StateDirs

LABEL = "com.solverx.daemon"
UNIT_NAME = "solverx.service"
DESCRIPTION = "SolverX daemon: serves a base model and its LoRA adapters, trains new adapter versions"
PROCESS_TYPES = ("Interactive", "Standard", "Adaptive", "Background")

# launchd gives agents PATH=/usr/bin:/bin:/usr/sbin:/sbin; systemd --user a similar minimal one.
_SYSTEM_PATH = {
    "darwin": ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"),
    "linux": ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"),
}


@dataclass(frozen=True)
class ServiceSpec:
    """What runs, where, with which environment, how it restarts — independent of the service manager."""

    program_arguments: tuple[str, ...]
    working_directory: Path
    log_directory: Path
    environment: Mapping[str, str] = field(default_factory=dict)
    label: str = LABEL
    unit_name: str = UNIT_NAME
    description: str = DESCRIPTION
    throttle_interval: int = 10
    """Seconds between restarts (launchd ThrottleInterval, systemd RestartSec): a crash loop cannot spin."""
    process_type: str = "Interactive"
    """launchd ProcessType. Background would throttle CPU and I/O: wrong for a server answering requests."""

    def __post_init__(self) -> None:
        if not self.program_arguments or not os.path.isabs(self.program_arguments[0]):
            raise ValueError(f"the program must be an absolute path, got {self.program_arguments[:1]!r}")
        if any(arg.startswith("~") for arg in self.program_arguments):
            raise ValueError("service managers do not expand '~': pass absolute paths as program arguments")
        for path in (self.working_directory, self.log_directory):
            if not Path(path).is_absolute():
                raise ValueError(f"service directories must be absolute, got {path}")
        if self.process_type not in PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {', '.join(PROCESS_TYPES)}")
        if any("\n" in f"{k}{v}" or "=" in k for k, v in self.environment.items()):
            raise ValueError("environment names cannot contain '=' and values cannot contain newlines")

    @property
    def stdout_path(self) -> Path:
        return self.log_directory / "daemon.out.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_directory / "daemon.err.log"


def service_environment(
    home: Path, python: str, platform: str = sys.platform, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The daemon's environment: a usable PATH, offline Hugging Face, its state dir, and OpenBLAS on Linux."""
    path_dirs = [os.path.dirname(python), *_SYSTEM_PATH.get(platform, _SYSTEM_PATH["linux"])]
    env = {
        "PATH": ":".join(dict.fromkeys(path_dirs)),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        HOME_ENV: str(home),
    }
    if platform == "linux":  # preload_env adds nothing unless this machine is Linux with OpenBLAS
        preload = preload_env({}).get("LD_PRELOAD")
        if preload:
            env["LD_PRELOAD"] = preload
    env.update(extra or {})
    return env


def build_spec(
    home: str | os.PathLike[str],
    *,
    serve_args: Sequence[str] = (),
    python: str | None = None,
    platform: str = sys.platform,
    extra_env: Mapping[str, str] | None = None,
) -> ServiceSpec:
    """The spec for ``<python> -m solverx serve --home <home> [serve_args]``, state and logs under ``home``.

    ``python`` defaults to this interpreter, kept unresolved so a virtual environment's ``bin/python`` stays
    the venv's (resolving the symlink would escape the venv and lose its packages).
    """
    home_path = Path(home).expanduser().resolve()
    python = os.path.abspath(python or sys.executable)
    return ServiceSpec(
        program_arguments=(python, "-m", "solverx", "serve", "--home", str(home_path), *serve_args),
        working_directory=home_path,
        log_directory=StateDirs(home_path).logs,
        environment=service_environment(home_path, python, platform, extra_env),
    )


def render_plist(spec: ServiceSpec) -> bytes:
    """The LaunchAgent property list (XML) for ``~/Library/LaunchAgents/<label>.plist``."""
    document = {
        "Label": spec.label,
        "ProgramArguments": list(spec.program_arguments),
        "WorkingDirectory": str(spec.working_directory),
        "EnvironmentVariables": dict(spec.environment),
        "RunAtLoad": True,
        # Restart after a crash, but not after a clean exit (e.g. `solverx` asked to stop).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": spec.throttle_interval,
        "ProcessType": spec.process_type,
        "StandardOutPath": str(spec.stdout_path),
        "StandardErrorPath": str(spec.stderr_path),
    }
    return plistlib.dumps(document, fmt=plistlib.FMT_XML, sort_keys=False)


def systemd_quote(word: str, *, exec_line: bool = False) -> str:
    """One word, double-quoted for a unit file: escapes backslashes, quotes, ``%`` and (Exec lines) ``$``."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The ``systemd --user`` unit for ``~/.config/systemd/user/<unit_name>``; output goes to the journal."""
    program, *args = spec.program_arguments
    if any(ord(c) < 32 or ord(c) == 127 or c in "\"'\\" for c in program):
        raise ValueError(f"systemd cannot run a program whose path has quotes or backslashes: {program}")
    # systemd expands $VAR in arguments but not in the program path itself.
    exec_start = " ".join([systemd_quote(program), *(systemd_quote(arg, exec_line=True) for arg in args)])
    environment = " ".join(systemd_quote(f"{k}={v}") for k, v in spec.environment.items())
    lines = [
        "[Unit]",
        f"Description={spec.description.replace('%', '%%')}",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={str(spec.working_directory).replace('%', '%%')}",
        *([f"Environment={environment}"] if environment else []),
        "Restart=on-failure",
        f"RestartSec={spec.throttle_interval}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def example_spec(platform: str) -> ServiceSpec:
    """The spec behind the checked-in ``*.example`` files: user ``alice``, repository in ``~/solverx``."""
    user_home = Path("/Users/alice" if platform == "darwin" else "/home/alice")
    data_dir = "Library/Application Support" if platform == "darwin" else ".local/share"
    state = user_home / data_dir / "solverx"
    python = str(user_home / "solverx/.venv/bin/python")
    env = {
        "PATH": ":".join([os.path.dirname(python), *_SYSTEM_PATH[platform]]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        HOME_ENV: str(state),
    }
    if platform == "linux":
        env["LD_PRELOAD"] = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    return ServiceSpec(
        program_arguments=(python, "-m", "solverx", "serve", "--home", str(state)),
        working_directory=state,
        log_directory=state / "logs",
        environment=env,
    )


EXAMPLES_DIR = Path(__file__).resolve().parent
EXAMPLE_FILES = {
    "darwin": EXAMPLES_DIR / f"{LABEL}.plist.example",
    "linux": EXAMPLES_DIR / f"{UNIT_NAME}.example",
}


def render_example(platform: str) -> bytes:
    """The text of one checked-in example file."""
    spec = example_spec(platform)
    return render_plist(spec) if platform == "darwin" else render_systemd_unit(spec).encode()


def write_examples() -> list[Path]:
    """Regenerate the checked-in example files; the service tests check they are current."""
    for platform, target in EXAMPLE_FILES.items():
        target.write_bytes(render_example(platform))
    return list(EXAMPLE_FILES.values())
