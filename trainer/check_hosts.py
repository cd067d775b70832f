"""``python -m solverx.trainer.check_hosts --base-dir DIR``: what ``solverx train --check-hosts`` runs on every rank.

It is started exactly as a training run is (:meth:`solverx.trainer.child.TrainHosts.command`), so it tests what a
run needs: every host reachable by the launcher, the ranks connected over the backend, the same solverx and MLX
versions, and the base model at the same path with the same fingerprint. Rank 0 prints one line per rank and
exits 1 when any rank differs from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
from importlib.metadata import version
from pathlib import Path

from solverx.blas import ensure_openblas
from solverx.trainer.child import die_with_parent


def rank_facts(base_dir: Path) -> dict[str, str]:
    import mlx.core as mx

    from solverx.adapters.fingerprint import base_fingerprint

    try:
        base = base_fingerprint(base_dir)
    except (OSError, ValueError) as exc:
        base = f"missing ({type(exc).__name__}: {exc})"
    return {
        "host": socket.gethostname(), "solverx": version("solverx"), "mlx": mx.__version__,
        "python": platform.python_version(), "base": base,
    }  # fmt: skip


def differences(facts: list[dict[str, str]]) -> list[str]:
    """What each rank has that rank 0 does not: the problems that would fail or skew a run."""
    problems = []
    for rank, mine in enumerate(facts[1:], 1):
        for key in ("solverx", "mlx", "python", "base"):
            if mine.get(key) != facts[0].get(key):
                problems.append(
                    f"rank {rank} ({mine.get('host')}): {key} {mine.get(key)} (rank 0: {facts[0].get(key)})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solverx.trainer.check_hosts")
    parser.add_argument("--base-dir", required=True, type=Path)
    args = parser.parse_args(argv)

    from solverx.trainer.distributed import gather_text, hosts, world

    group = world()
    facts = [json.loads(text) for text in gather_text(group, json.dumps(rank_facts(args.base_dir)))]
    if group.rank() != 0:
        return 0
    for rank, (address, fact) in enumerate(zip(hosts(), facts, strict=False)):
        print(f"rank {rank}: {fact['host']} ({address}) solverx {fact['solverx']}, mlx {fact['mlx']}, "
              f"python {fact['python']}, base {fact['base'][:23]}")  # fmt: skip
    problems = differences(facts)
    for problem in problems:
        print(f"solverx: {problem}")
    print(f"{group.size()} ranks {'differ' if problems else 'ready'}: base {args.base_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    die_with_parent()
    ensure_openblas()
    sys.exit(main())
