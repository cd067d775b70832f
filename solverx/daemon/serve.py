"""``solverx serve``: build the state, load the base models and run uvicorn until a signal stops it.

One uvicorn worker, always: the engine holds the model in this process and batches every request through one
thread, so a second worker would load a second copy and split the batches. On SIGINT/SIGTERM uvicorn stops
accepting connections, gives open streams a few seconds, and the app's lifespan stops the engines.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

import uvicorn

from solverx.adapters.registry import Registry
from solverx.config import Settings
from solverx.daemon.exclusive import exclusive_training
from solverx.engine.core import Engine, EngineConfig
from solverx.models.builtin import SMOLLM_BASE_ID
from solverx.paths import StateDirs, state_dirs
from solverx.server.adapter_source import RegistryAdapterSource
from solverx.server.app import ServerState, create_app
from solverx.server.models import ModelCatalog
from solverx.trainer.schedule import TrainingManager

__all__ = ["run"]

GRACEFUL_SHUTDOWN_S = 5
DEFAULT_BASE = SMOLLM_BASE_ID

log = logging.getLogger("solverx.server")


def run(
    host: str | Settings = "127.0.0.1",
    port: int = 8080,
    home: str | Path | None = None,
    base_dir: str | Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve the default base (or the model in ``base_dir``, named after its folder) on ``host:port``.

    ``solverx serve`` passes its resolved :class:`~solverx.config.Settings` as the only argument instead;
    then they decide everything (bases, limits, API key). Blocks until the server is stopped. ``port=0`` picks
    a free port; the ready line names the real one.
    """
    if isinstance(host, Settings):
        return _run_settings(host, base_dir)
    _configure_logging(log_level)
    bases = (str(base_dir),) if base_dir is not None else (DEFAULT_BASE,)
    _serve(_state(state_dirs(home), bases, EngineConfig()), host, port, log_level)


def _run_settings(settings: Settings, base_dir: str | Path | None) -> None:
    _configure_logging(settings.log_level)
    if not _is_loopback(settings.host) and not settings.api_key:
        raise SystemExit(
            f"solverx: refusing to listen on {settings.host}: anyone on the network could use it. "
            "Set an API key (--api-key, SOLVERX_API_KEY or api_key in config.toml) or bind 127.0.0.1."
        )
    bases = (str(base_dir),) if base_dir is not None else settings.base_models
    engine_config = EngineConfig(
        max_resident_adapters=settings.max_resident_adapters,
        max_adapter_bytes=settings.max_adapter_bytes,
        prefill_chunk_while_decoding=settings.prefill_chunk_while_decoding,
        prompt_cache_bytes=settings.prompt_cache_bytes,
        int8_activations=settings.cpu_activations == "int8",
    )
    dirs = state_dirs(settings.home)
    state = _state(dirs, bases, engine_config)
    default_base = next(iter(state.catalog.engines))  # an inbox whose recipe names no base trains on it
    state.training = TrainingManager(
        dirs,
        state.registry,
        debounce_s=settings.train_debounce_seconds,
        schedule=settings.train_schedule,
        exclusive=exclusive_training(
            state.catalog.engines, settings.training_exclusive, settings.max_resident_adapters
        ),
        default_base=default_base,
        hosts=settings.training_hosts(),
    )
    state.max_body_bytes = settings.max_body_bytes
    state.max_tokens_cap = settings.max_tokens_cap
    state.default_model = settings.default_model or default_base
    state.api_key = settings.api_key
    _serve(state, settings.host, settings.port, settings.log_level)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _state(dirs: StateDirs, bases: tuple[str, ...], engine_config: EngineConfig) -> ServerState:
    engines = {}
    for entry in bases:
        base_id, model_dir = _locate_base(dirs, entry)
        log.info("serving %s from %s", base_id, model_dir)
        engines[base_id] = Engine(model_dir, base_id, engine_config)
    registry = Registry(dirs.adapters, max_adapter_bytes=engine_config.max_adapter_bytes)
    registry.recover()  # a daemon or trainer killed mid-registration left a half-written version in .tmp/
    for path in dirs.sweep_partial_writes():  # ... or, killed mid-write, a cache file that never got renamed
        log.info("removed %s, left by an interrupted write", path)
    return ServerState(ModelCatalog(engines, RegistryAdapterSource(registry)), registry=registry)


def _locate_base(dirs: StateDirs, entry: str) -> tuple[str, Path]:
    """A base given as a directory is named after it; an id lives in ``<home>/models/<id>`` (the built-in bases,
    :mod:`solverx.models.builtin`, are made there on first use)."""
    path = Path(entry).expanduser()
    if path.is_dir():
        path = Path(os.path.abspath(path))  # the name a user gave (a link keeps its own name)
        return path.name, path
    from solverx.models.builtin import BaseModelMissing, ensure_builtin

    try:
        built = ensure_builtin(dirs.models, entry)
    except BaseModelMissing as exc:
        raise SystemExit(f"solverx: {exc}") from None
    if built is not None:
        return entry, built
    model_dir = dirs.model(entry)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"solverx: base model {entry!r} not found: no {model_dir}/config.json")
    return entry, model_dir


def _serve(state: ServerState, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        workers=1,
        lifespan="on",
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,  # solverx.server.logs writes one JSON line per request, with its request id
    )
    _Server(config, ", ".join(state.catalog.engines)).run()


class _Server(uvicorn.Server):
    """uvicorn's server, announcing itself once the models are loaded and the socket is bound."""

    def __init__(self, config: uvicorn.Config, served: str):
        super().__init__(config)
        self.served = served

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"solverx: serving {self.served} on http://{shown}:{port}", flush=True)


def _configure_logging(level: str) -> None:
    """Our own loggers (``solverx.*``) print like uvicorn's; uvicorn configures its own."""
    logger = logging.getLogger("solverx")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
