"""Run MLX on Debian's OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (~6 GFLOP/s on fp32 matmuls); preloading OpenBLAS gives ~200.
A preload only works if it is in place when the process starts, so the entry point re-executes itself once with
``LD_PRELOAD`` set. ``SOLVERX_NO_OPENBLAS=1`` turns this off (the training benchmark uses it for its baseline).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
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


def _loaded_openblas() -> ctypes.CDLL | None:
    """This process's OpenBLAS, if it is mapped in and exposes its thread controls."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    path = next((line.split()[-1] for line in maps.splitlines() if "libopenblas" in line), None)
    library = ctypes.CDLL(path) if path else None
    return library if library is not None and hasattr(library, "openblas_set_num_threads") else None


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """OpenBLAS on ``count`` threads while the block runs (a no-op where OpenBLAS is not loaded).

    Local ranks each start with a share of the cores; rank 0 takes them all back for the stages only it runs
    (self replay, evaluation), while the others wait on the group.
    """
    library = _loaded_openblas()
    if library is None:
        yield
        return
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(max(1, count))
    try:
        yield
    finally:
        library.openblas_set_num_threads(before)
