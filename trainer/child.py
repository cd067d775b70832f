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
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from solverx.blas import ensure_openblas, preload_env, threads_each
from solverx.models.builtin import SMOLLM_BASE_ID

EXIT_REFUSED = 3
EXIT_ORPHANED = 4
EXIT_LOST_PEER = 6  # rank 0 of a distributed run: a collective failed because another rank is gone
PARENT_POLL_S = 0.5
PARENT_PID_ENV = "SOLVERX_TRAINER_PARENT"  # the starting process's pid (child_env)
WORLD_SIZE_ENV = "_SOLVERX_WORLD_SIZE"  # for the launcher: how many ranks must report their exit


def child_env() -> dict[str, str]:
    """The environment to start a training child in: OpenBLAS preloaded, and this process's pid as its parent's
    (read by :func:`die_with_parent`)."""
    return {**preload_env(), PARENT_PID_ENV: str(os.getpid())}


BACKENDS = ("ring", "mpi", "jaccl")  # mx.distributed's backends that mlx.launch starts
LOCAL_HOST = "127.0.0.1"  # mlx.launch starts a rank itself, without ssh, only on this exact address


@dataclass(frozen=True)
class TrainHosts:
    """Where a run trains: in one local process (no hosts, or one), or one rank per host through ``mlx.launch``
    (a list of addresses, repeats allowed, or the path of an ``mlx.launch`` hostfile)."""

    hosts: tuple[str, ...] = ()
    backend: str = "ring"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"train_backend {self.backend!r}: must be one of {', '.join(BACKENDS)}")
        if self.hostfile is None and self.backend == "ring" and len(self.hosts) > 1:
            names = [host for host in self.hosts if not _is_ip(host)]
            if names:
                raise ValueError(
                    f"train_hosts: the ring backend connects ranks by IP address, and {names[0]!r} is not one; "
                    "give IP addresses, or an mlx.launch hostfile (.json) with each host's ssh name and IPs"
                )

    @property
    def hostfile(self) -> Path | None:
        if len(self.hosts) == 1 and self.hosts[0].endswith(".json"):
            return Path(self.hosts[0]).expanduser()
        return None

    def addresses(self) -> list[str]:
        """One entry per rank (a hostfile's ``ssh`` names)."""
        if self.hostfile is None:
            return list(self.hosts)
        hosts = json.loads(self.hostfile.read_text())
        hosts = hosts["hosts"] if isinstance(hosts, dict) else hosts
        return [h.get("ssh") or ",".join(h.get("ips", [])) for h in hosts]

    @property
    def world_size(self) -> int:
        return len(self.addresses()) if self.hosts else 1

    def launcher(self) -> list[str]:
        """What goes before a rank's command line: nothing for one process, else the launcher and its options."""
        if self.world_size <= 1:
            return []
        where = ["--hostfile", str(self.hostfile)] if self.hostfile else ["--hosts", ",".join(self.hosts)]
        port = ["--starting-port", str(_free_ports(self.world_size))] if self.backend == "ring" else []
        return [sys.executable, "-m", "solverx.trainer.launch", "--backend", self.backend, *where, *port, "--"]

    def command(self, child_args: Sequence[str], module: str = "solverx.trainer.child") -> list[str]:
        """The command line that starts the training child, or another ``module`` that runs on every rank."""
        return [*self.launcher(), sys.executable, "-m", module, *child_args]

    def env(self) -> dict[str, str]:
        """The launcher's (and its local ranks') environment: :func:`child_env`, the world size, and for ranks
        that share this machine their share of its cores for BLAS."""
        env = child_env()
        if self.world_size > 1:
            env[WORLD_SIZE_ENV] = str(self.world_size)
            local = sum(1 for host in self.addresses() if host == LOCAL_HOST)
            if local > 1 and "OPENBLAS_NUM_THREADS" not in env:
                env["OPENBLAS_NUM_THREADS"] = str(threads_each(local))
        return env


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _free_ports(count: int, first: int = 41000, last: int = 60000) -> int:
    """The first of ``count`` consecutive ports free on this machine (the ring backend listens on port + rank)."""
    for start in range(first + os.getpid() % 997 * 16, last, count):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(start, start + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((LOCAL_HOST, port))
            except OSError:
                continue
            return start
    raise OSError(f"no {count} consecutive free ports between {first} and {last}")


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away (MLX's ring: "connection to a peer was lost")."""
    return isinstance(exc, RuntimeError) and "peer" in str(exc)


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

    from solverx.trainer.distributed import serve_stages, world

    group = world()  # every rank joins the group first: a launched worker waits for rank 0 here
    if group.rank() != 0:
        serve_stages(group)
        return 0

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
        if group.size() > 1 and lost_peer(exc):
            # Another rank died (or its host went away): the launcher knows which and says so; see launch.py.
            print(f"solverx: rank 0 lost a peer: {exc}", file=sys.stderr, flush=True)
            return EXIT_LOST_PEER
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
