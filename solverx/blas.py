"""Run MLX on Debian's OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~6 GFLOP/s on fp32 matmuls); preloading OpenBLAS gives ~200.
A preload only works if it is in place when the process starts, so the entry point re-executes itself once with
``LD_PRELOAD`` set. ``SOLVERX_NO_OPENBLAS=1`` turns this off (the training benchmark uses it for its baseline).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
DISABLE_ENV = "SOLVERX_NO_OPENBLAS"
_INSTALL_HINT = "install it with: sudo apt-get install libopenblas0-pthread"


def find_openblas() -> str | None:
    """The path of Debian's pthread OpenBLAS, if installed."""
    return next((path for path in OPENBLAS_CANDIDATES if Path(path).exists()), None)


def openblas_loaded() -> bool:
    """Whether OpenBLAS is mapped into this process (Linux only)."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def preload_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with OpenBLAS added to ``LD_PRELOAD`` where it is available."""
    env = dict(os.environ if environ is None else environ)
    library = find_openblas()
    if sys.platform != "linux" or library is None or env.get(DISABLE_ENV) == "1":
        return env
    preloads = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if library not in preloads:
        env["LD_PRELOAD"] = ":".join([library, *preloads])
    return env


def ensure_openblas() -> None:
    """Re-execute this very command line with OpenBLAS preloaded, once; warn when it cannot be found.

    Returns only when no re-exec is needed. Call it before anything imports MLX.
    """
    if sys.platform != "linux" or os.environ.get(DISABLE_ENV) == "1" or openblas_loaded():
        return
    if find_openblas() is None:
        print(f"solverx: OpenBLAS not found, MLX will run ~30x slower; {_INSTALL_HINT}", file=sys.stderr)
        return
    if os.environ.get("_SOLVERX_REEXEC") == "1":
        return  # the preload did not take; do not loop
    env = preload_env()
    env["_SOLVERX_REEXEC"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def threads_each(processes: int) -> int:
    """OpenBLAS threads for each of ``processes`` that share this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))
