"""One training run in the trainer's child process, followed from the caller's process.

``solverx train --now`` and ``solverx demo`` start the same child the daemon starts
(``python -m solverx.trainer.child``) and read its run log as it grows, so what they show is what the daemon would
record.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from solverx.paths import StateDirs
from solverx.trainer.child import TrainHosts
from solverx.trainer.run import new_run_id
from solverx.trainer.runlog import CHILD_OUTPUT, read_events, record_silent_exit


@dataclass
class ChildRun:
    """A started child: its run id and directory, and the process."""

    run_id: str
    run_dir: Path
    process: subprocess.Popen

    def events(self, poll_seconds: float = 0.2) -> Iterator[dict]:
        """The run log's events as they are written, until the child exits; stopping early terminates it."""
        seen = 0
        try:
            while True:
                done = self.process.poll() is not None
                for event in list(read_events(self.run_dir, seen)):
                    seen += 1
                    yield event
                if done:
                    silent = record_silent_exit(self.run_dir, self.process.returncode, self.run_dir / CHILD_OUTPUT)
                    if silent is not None:
                        yield silent
                    return
                time.sleep(poll_seconds)
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the child if it still runs (the previous version keeps serving)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def start_child(
    dirs: StateDirs,
    adapter: str,
    *,
    replay: bool = True,
    default_base: str | None = None,
    hosts: TrainHosts | None = None,
    blas_threads: int | None = None,
    niceness: int = 0,
) -> ChildRun:
    """Start ``python -m solverx.trainer.child`` for ``adapter``'s inbox (on ``hosts``' ranks when there are
    several); its output goes to ``<run>/child.log``. ``blas_threads`` caps OpenBLAS's threads and ``niceness``
    lowers the child's CPU priority (runs sharing the machine)."""
    run_id = new_run_id(adapter)
    run_dir = dirs.runs / run_id
    run_dir.mkdir(parents=True)
    args = ["--home", str(dirs.root), "--adapter", adapter, "--run-id", run_id, *([] if replay else ["--no-replay"])]
    args += ["--default-base", default_base] if default_base else []
    hosts = hosts or TrainHosts()
    env = hosts.env() | ({"OPENBLAS_NUM_THREADS": str(blas_threads)} if blas_threads else {})
    with (run_dir / CHILD_OUTPUT).open("ab") as output:
        process = subprocess.Popen(hosts.command(args), cwd=dirs.root, env=env, stdout=output, stderr=subprocess.STDOUT)
    if niceness:  # set from outside: a preexec_fn is unsafe in a threaded parent
        os.setpriority(os.PRIO_PROCESS, process.pid, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    return ChildRun(run_id, run_dir, process)
