"""The training child process: ``python -m solverx.trainer.child --home DIR --adapter NAME --run-id ID``.

Exit codes: 0 trained (promoted or rejected by the gate — see the run log), 3 refused (nothing valid to train),
1 failed. Whatever happens, the last event in the run log says so; a kill -9 leaves no ``finished`` event, which
the daemon reports as failed. The process that started the run owns it: when that process dies (even by kill -9),
the child dies too (:func:`die_with_parent`), so no orphan keeps training into a run the restarted daemon reports
as failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

from solverx.blas import ensure_openblas, preload_env
from solverx.models.builtin import SMOLLM_BASE_ID

EXIT_REFUSED = 3
EXIT_ORPHANED = 4
PARENT_POLL_S = 0.5
PARENT_PID_ENV = "SOLVERX_TRAINER_PARENT"  # the starting process's pid (child_env)


def child_env() -> dict[str, str]:
    """The environment to start a training child in: OpenBLAS preloaded, and this process's pid as its parent's
    (read by :func:`die_with_parent`)."""
    return {**preload_env(), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Exit when the parent exits: Linux's parent-death signal, and everywhere a thread watching the parent pid
    (macOS has no such signal; a reparented child sees its ``getppid()`` change)."""
    # The pid the daemon gave us, not getppid(): if the daemon died while this process started up, getppid() is
    # already the reaper's, and the parent-death signal below would never come.
    parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    if os.getppid() != parent:  # gone already, before the signal was armed
        os._exit(EXIT_ORPHANED)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solverx.trainer.child")
    parser.add_argument("--home", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--no-replay", action="store_true", help="train without general replay data")
    parser.add_argument(
        "--default-base", default=SMOLLM_BASE_ID, help="the base a recipe without `base` trains on (the daemon's)"
    )
    args = parser.parse_args(argv)

    from solverx.trainer.run import RunOptions, RunRefused, run_training
    from solverx.trainer.runlog import RunLog

    log = RunLog(Path(args.home) / "runs" / args.run_id)
    try:
        outcome = run_training(
            Path(args.home),
            args.adapter,
            args.run_id,
            RunOptions(replay=not args.no_replay, default_base=args.default_base),
        )
    except RunRefused as exc:
        log.write("finished", state="skipped", error=str(exc))
        return EXIT_REFUSED
    except BaseException as exc:  # the run log is the user's only window into a failure
        log.write("finished", state="failed", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return 1
    print(f"run {outcome.run_id}: {outcome.state}, version {outcome.version}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    die_with_parent()
    ensure_openblas()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip MLX's thread teardown crash (ml-explore/mlx#3126); everything is written
