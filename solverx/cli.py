"""The ``solverx`` command line.

Every command imports its machinery lazily, so ``solverx --help`` is instant and the OpenBLAS re-exec happens
before MLX is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from solverx import __version__
from solverx.blas import ensure_openblas

Handler = Callable[[argparse.Namespace], int]


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import run

    run(host=args.host, port=args.port, home=args.home, log_level=args.log_level)
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from solverx.paths import state_dirs
    from solverx.tiny import TINY_BASE_ID, build_tiny, ensure_tiny

    models = state_dirs(args.home).models
    if args.force:
        path = build_tiny(models / TINY_BASE_ID)
    else:
        path = ensure_tiny(models)
    print(f"solverx: tiny base model ready at {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solverx",
        description="Serve a local base model and its LoRA adapters through an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"solverx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (OpenAI-compatible API on localhost)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080)")
    serve.add_argument("--home", help="state directory (default: $SOLVERX_HOME or the platform data dir)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_cmd_serve)

    tiny = commands.add_parser("build-tiny", help="build the tiny offline base model (solverx-tiny)")
    tiny.add_argument("--home", help="state directory")
    tiny.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    tiny.set_defaults(handler=_cmd_build_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ensure_openblas()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    # MLX used from a worker thread can crash during interpreter teardown (ml-explore/mlx#3126); every
    # command has finished its work and flushed its files here, so leave without running C++ destructors.
    os._exit(code)
