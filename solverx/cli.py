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
from solverx.config import add_arguments

Handler = Callable[[argparse.Namespace], int]


def _user_facing_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story for the user: printed without a traceback."""
    from solverx.adapters.errors import AdapterError
    from solverx.config import ConfigError
    from solverx.launchd.control import ServiceError

    return (ConfigError, ServiceError, AdapterError)


def _settings(args: argparse.Namespace):
    from solverx.config import load_settings

    return load_settings(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from solverx.daemon.serve import run

    settings, _ = _settings(args)
    run(settings)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from solverx.config import format_settings

    print(format_settings(*_settings(args)))
    return 0


def _cmd_service(args: argparse.Namespace) -> int:
    from solverx import launchd

    settings, _ = _settings(args)
    serve_args = ("--config", str(settings.config)) if settings.config and settings.config.exists() else ()
    spec = launchd.build_spec(settings.home, serve_args=serve_args)
    action = args.action
    if action == "status":
        state = launchd.status(spec)
        print(f"installed: {state.installed}  running: {state.running}  unit: {state.unit_file}")
        if state.detail:
            print(state.detail)
        return 0 if state.running else 3
    if action == "logs":
        return launchd.logs(spec, lines=args.lines, follow=args.follow)
    print(getattr(launchd, action)(spec))
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from solverx.models.tiny import TINY_BASE_ID, build_tiny, ensure_tiny
    from solverx.paths import state_dirs

    models = state_dirs(args.home).models
    path = build_tiny(models / TINY_BASE_ID) if args.force else ensure_tiny(models)
    print(f"solverx: tiny base model ready at {path}")
    return 0


def _cmd_adapters(args: argparse.Namespace) -> int:
    from solverx.commands import adapters_command

    return adapters_command(args, _settings(args)[0])


def _cmd_facts(args: argparse.Namespace) -> int:
    from solverx.commands import facts_command

    return facts_command(args, _settings(args)[0])


def _cmd_train(args: argparse.Namespace) -> int:
    from solverx.commands import train_command

    return train_command(args, _settings(args)[0])


def _cmd_status(args: argparse.Namespace) -> int:
    from solverx.commands import status_command

    return status_command(args, _settings(args)[0])


def _cmd_prepare(args: argparse.Namespace) -> int:
    from solverx.commands import prepare_command

    return prepare_command(args, _settings(args)[0])


def _cmd_plan(args: argparse.Namespace) -> int:
    from solverx.commands import plan_command

    return plan_command(args, _settings(args)[0])


def _cmd_demo(args: argparse.Namespace) -> int:
    from solverx import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solverx",
        description="Serve a local base model and its LoRA adapters through an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="version", version=f"solverx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (OpenAI-compatible API on localhost)")
    add_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)

    config = commands.add_parser("config", help="show the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print every setting and where its value came from")
    add_arguments(show)
    show.set_defaults(handler=_cmd_config_show)

    service = commands.add_parser("service", help="install and control the background service")
    service.add_argument("action", choices=["install", "uninstall", "start", "stop", "restart", "status", "logs"])
    service.add_argument("--lines", type=int, default=100, help="logs: how many lines to show")
    service.add_argument("--follow", "-f", action="store_true", help="logs: keep following")
    add_arguments(service)
    service.set_defaults(handler=_cmd_service)

    from solverx.commands import add_adapters_parser, add_facts_parser, add_model_parsers

    add_adapters_parser(commands, add_arguments)
    commands.choices["adapters"].set_defaults(handler=_cmd_adapters)
    add_facts_parser(commands, add_arguments)
    commands.choices["facts"].set_defaults(handler=_cmd_facts)
    add_model_parsers(commands, add_arguments)
    commands.choices["prepare"].set_defaults(handler=_cmd_prepare)
    commands.choices["plan"].set_defaults(handler=_cmd_plan)

    train = commands.add_parser("train", help="train an adapter from its inbox folder")
    train.add_argument("adapter", nargs="?")
    train.add_argument("--now", action="store_true", help="run here in the foreground with a progress bar")
    train.add_argument(
        "--check-hosts", action="store_true", help="check that every host of train_hosts can take part in a run"
    )
    train.add_argument("--no-replay", action="store_true", help="train without general replay data (ablation)")
    add_arguments(train)
    train.set_defaults(handler=_cmd_train)

    status = commands.add_parser("status", help="what the daemon serves and trains")
    add_arguments(status)
    status.set_defaults(handler=_cmd_status)

    demo = commands.add_parser(
        "demo",
        help="reproduce the seed's experiment offline (tiny chat base, watch folder, trainer) and write a report",
    )
    from solverx.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(handler=_cmd_demo)

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
    except _user_facing_errors() as exc:
        print(f"solverx: error: {exc}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    # MLX used from a worker thread can crash during interpreter teardown (ml-explore/mlx#3126); every
    # command has finished its work and flushed its files here, so leave without running C++ destructors.
    os._exit(code)
