"""What the real-base benchmarks share: the default base, imported once into ``.state/bench``, and a daemon
serving it from a throw-away home with the flags a benchmark compares."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_base() -> tuple[Path, str]:
    """The default base's directory (imported from its wheel on first use) and id."""
    from solverx.models.builtin import SMOLLM_BASE_ID, ensure_smollm

    return ensure_smollm(REPO / ".state" / "bench" / "models"), SMOLLM_BASE_ID


@dataclass(frozen=True)
class Served:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def serve(model_dir: Path, base_id: str, *flags: str, timeout: float = 180) -> Iterator[Served]:
    """``solverx serve`` on ``model_dir`` in a fresh home, ready when this yields; stopped on exit."""
    import httpx

    from solverx.blas import preload_env

    env = dict(preload_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="solverx-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / "models").mkdir(parents=True)
        (home / "models" / base_id).symlink_to(model_dir)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "solverx", "serve", "--home", str(home), "--port", str(port),
             "--base-models", base_id, "--log-level", "warning", *flags],
            cwd=REPO, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the daemon exited with {process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not come up")
                time.sleep(0.3)
            yield Served(url, process)
        finally:
            process.terminate()
            process.wait(timeout=60)
