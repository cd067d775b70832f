"""``python -m solverx.trainer.launch [mlx.launch arguments] -- COMMAND``: MLX's own launcher, fit for a daemon.

A distributed training run is started through ``mlx.launch`` (MLX's launcher: its hostfile, ssh, ring/MPI/JACCL
set-up, killing every rank when one fails). Three things it does not do that a daemon needs, added here around it,
without touching how ranks are started or how they talk:

- its per-rank threads wait for the rank's stdin pipe to be writable, which a pipe always is, so each spins a
  core (measured: the launcher at 87 % CPU on this 2-core machine, and each rank's step 1.8× slower); our ranks read
  no stdin, so they wait on the ranks' output only, and the launcher's own stdin is a pipe nobody writes;
- it exits 0 even when a rank failed: we exit with rank 0's code, or :data:`EXIT_RANK_FAILED` when another rank
  failed, after a line that says which rank stopped and how;
- it dies with the process that started it (the daemon), and local ranks die with it
  (:func:`solverx.trainer.child.die_with_parent`); remote ranks lose their ssh session.
"""

from __future__ import annotations

import os
import sys
import time

from solverx.trainer.child import EXIT_LOST_PEER, PARENT_PID_ENV, WORLD_SIZE_ENV, die_with_parent

EXIT_RANK_FAILED = 5
_STDIN_WRITER: int | None = None


Status = tuple[int | None, bool | None, float]  # a rank's exit code, whether the launcher stopped it, when seen


def _patch_launcher(statuses: dict[int, Status]) -> None:
    from select import select

    from mlx._distributed_utils import launch as mlx_launch

    def select_readable(rlist, wlist, xlist, timeout=None):  # wlist: the ranks' stdin pipes, always writable
        readable, _, errors = select(rlist, [], xlist, timeout)
        return readable, [], errors

    class RecordedProcess(mlx_launch.RemoteProcess):
        def __init__(self, rank, *args, **kwargs):
            super().__init__(rank, *args, **kwargs)
            self._rank = rank

        @property
        def exit_status(self):
            status = super().exit_status
            if status[0] is not None and self._rank not in statuses:
                statuses[self._rank] = (*status, time.monotonic())
            return status

    mlx_launch.select = select_readable
    mlx_launch.RemoteProcess = RecordedProcess


def _quiet_stdin() -> None:
    """Make fd 0 a pipe that never gets data: the launcher polls it for input to forward, which /dev/null (always
    readable, always empty) turns into a busy loop."""
    global _STDIN_WRITER
    read_end, _STDIN_WRITER = os.pipe()  # the write end stays open, unused, for the process's life
    os.dup2(read_end, 0)
    os.close(read_end)


def describe(rank: int, status: Status) -> str:
    code, killed, _ = status
    if killed:
        return f"rank {rank} was stopped by the launcher"
    if code is not None and code < 0:
        return f"rank {rank} was killed by signal {-code}"
    return f"rank {rank} exited with code {code}"


def exit_code(statuses: dict[int, Status], world_size: int) -> tuple[int, str | None]:
    """The launcher's exit code and, when a rank failed, the line that says which rank failed first.

    The first to exit with an error is the cause: the launcher then stops the others (SIGTERM), and they fail too;
    rank 0 may notice a lost peer before the launcher notices the peer's exit, so its :data:`EXIT_LOST_PEER` never
    names the cause when another rank failed.
    """
    failed = {rank: s for rank, s in statuses.items() if s[0] != 0 or s[1]}
    if len(failed) > 1 and failed.get(0, (None,))[0] == EXIT_LOST_PEER:
        del failed[0]  # rank 0 only saw another rank go: that one is the cause, whenever its exit was seen
    if not failed:
        return (0, None) if len(statuses) >= world_size else (EXIT_RANK_FAILED, "a rank never reported its exit")
    rank = min(failed, key=lambda r: (failed[r][2], r))
    code = failed[rank][0]
    if rank == 0 and code is not None and code > 0:
        return code, None  # rank 0 says why in the run log (3: refused, 1: failed)
    return EXIT_RANK_FAILED, describe(rank, failed[rank])


def main(argv: list[str] | None = None) -> int:
    from mlx._distributed_utils import launch as mlx_launch

    die_with_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # local ranks are this process's children
    statuses: dict[int, Status] = {}
    _patch_launcher(statuses)
    _quiet_stdin()
    sys.argv = ["mlx.launch", *(sys.argv[1:] if argv is None else argv)]
    mlx_launch.main()
    world_size = int(os.environ.get(WORLD_SIZE_ENV, "0")) or len(statuses)
    code, reason = exit_code(statuses, world_size)
    if reason:
        # on a line of its own: a rank's progress bar may have left the last one open
        print(f"\nsolverx: the distributed run stopped: {reason}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
