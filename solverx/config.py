"""Settings from one TOML file, the environment and the command line, with one documented precedence.

Precedence, highest first: a CLI flag ``--<name-with-dashes>``, an env var ``SOLVERX_<NAME>``, a key
``<name>`` in the config file, the built-in default. The config file is ``config.toml`` in the platform's
config dir, or the path given by ``--config`` / ``SOLVERX_CONFIG``. :func:`load_settings` also says where each
value came from, so ``solverx config show`` can answer "why is the port 9000?".
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from solverx.models.builtin import SMOLLM_BASE_ID
from solverx.trainer.child import BACKENDS, TrainHosts

APP_NAME = "solverx"
ENV_PREFIX = "SOLVERX_"
MiB = 1024 * 1024
TRAINING_EXCLUSIVE = ("auto", "always", "never")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A setting could not be read; the message names the setting and where the bad value came from."""


@dataclass(frozen=True)
class Settings:
    """Every daemon setting, resolved. ``config`` is the file that was (or would have been) read."""

    host: str
    port: int
    api_key: str | None
    home: Path
    default_model: str | None
    base_models: tuple[str, ...]
    max_resident_adapters: int
    max_adapter_bytes: int
    train_schedule: str | None
    train_debounce_seconds: float
    training_exclusive: str
    log_level: str
    max_tokens_cap: int
    max_body_bytes: int
    prefill_chunk_while_decoding: int
    prompt_cache_bytes: int
    cpu_activations: str
    train_hosts: tuple[str, ...] | None
    train_backend: str
    config: Path

    def training_hosts(self) -> TrainHosts:
        """Where runs train: ``train_hosts``' ranks with ``train_backend``, or one process here."""
        return TrainHosts(self.train_hosts or (), self.train_backend)


@dataclass(frozen=True)
class SettingField:
    """One setting: its name, value type (as shown to users), default and help text."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    in_file: bool = True
    """False only for ``config`` itself, which says where the file is and so cannot be set inside it."""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        return self.type.endswith(" or none")


def default_home() -> Path:
    """The platform data dir: ~/Library/Application Support/solverx (macOS), ~/.local/share/solverx."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def default_config_path() -> Path:
    """``config.toml`` in the platform's config dir (Linux ``~/.config/solverx``)."""
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.toml"


SETTINGS_FIELDS: tuple[SettingField, ...] = (
    SettingField("host", "string", "127.0.0.1", "address to listen on; keep loopback unless api_key is set"),
    SettingField("port", "integer", 8080, "TCP port to listen on (0 picks a free one)", minimum=0, maximum=65535),
    SettingField(
        "api_key",
        "string or none",
        None,
        "require 'Authorization: Bearer <key>'; prefer the env var to the flag",
    ),
    SettingField("home", "path", default_home, "state dir: models, adapters, inbox, runs, logs"),
    SettingField(
        "default_model", "string or none", None, "model used when a request names none (unset: the first base)"
    ),
    SettingField("base_models", "list", (SMOLLM_BASE_ID,), "base model ids or dirs to serve (comma-separated)"),
    SettingField("max_resident_adapters", "integer", 8, "adapters kept in memory at once (LRU)", minimum=1),
    SettingField("max_adapter_bytes", "size", 512 * MiB, "largest adapter accepted, e.g. 512MiB", minimum=1),
    SettingField("train_schedule", "cron or none", None, "5-field cron schedule for training runs, e.g. '0 3 * * *'"),
    SettingField("train_debounce_seconds", "number", 10.0, "quiet time after inbox changes before training", minimum=0),
    SettingField(
        "training_exclusive",
        "choice",
        "auto",
        "pause serving while training: auto (when memory needs it), always, never",
        choices=TRAINING_EXCLUSIVE,
    ),
    SettingField("log_level", "choice", "info", "logging verbosity", choices=LOG_LEVELS),
    SettingField("max_tokens_cap", "integer", 4096, "upper bound on max_tokens per request", minimum=1),
    SettingField("max_body_bytes", "size", 1 * MiB, "largest request body accepted, e.g. 1MiB", minimum=1),
    SettingField(
        "prefill_chunk_while_decoding",
        "integer",
        256,
        "most prompt tokens prefilled between two decode steps while others stream (fewer if slow; 0: 512, unbudgeted)",
        minimum=0,
    ),
    SettingField(
        "prompt_cache_bytes", "size", 256 * MiB, "KV cache of recent prompts, for their next turns (0: off)", minimum=0
    ),
    SettingField(
        "cpu_activations",
        "choice",
        "float32",
        "decode products of a 4/8-bit base on a CPU: float32 (answers as the float32 model) or int8 (x rounded per "
        "32 values with AVX-512 VNNI, as llama.cpp: faster for several streams, answers differ after a few tokens)",
        choices=("float32", "int8"),
    ),
    SettingField(
        "train_hosts",
        "list or none",
        None,
        "train over several ranks through mlx.launch: their addresses (repeats allowed, 127.0.0.1 for this machine) "
        "or an mlx.launch hostfile (.json); unset: one process here",
    ),
    SettingField(
        "train_backend", "choice", "ring", "mx.distributed backend of a run over train_hosts", choices=BACKENDS
    ),
    SettingField("config", "path", default_config_path, "config file to read", in_file=False),
)
FIELDS_BY_NAME = {f.name: f for f in SETTINGS_FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--<name>`` for every setting; defaults are None so an absent flag never overrides env or file."""
    group = parser.add_argument_group("settings", "each also SOLVERX_<NAME> or <name> in config.toml")
    for field in SETTINGS_FIELDS:
        metavar = "{" + ",".join(field.choices) + "}" if field.choices else field.type.split()[0].upper()
        default = field.default() if callable(field.default) else field.default
        shown = "none" if default is None else _display(field, default)
        help_text = f"{field.help} (default {shown}; env {field.env})"
        group.add_argument(field.flag, dest=field.name, default=None, metavar=metavar, help=help_text)


def load_settings(
    cli_args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] = os.environ,
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Resolve every setting by precedence; returns the settings and, per setting, where its value came from.

    ``config_path`` (if given) beats ``--config`` and ``SOLVERX_CONFIG``. A missing default config file is
    fine; a missing file that was asked for explicitly is an error.
    """
    flags = _flag_values(cli_args)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    config_field = FIELDS_BY_NAME["config"]
    if config_path is not None:
        values["config"], sources["config"] = Path(config_path).expanduser().resolve(), "explicit path"
    else:
        values["config"], sources["config"] = _resolve(config_field, flags, env, {}, None)
    file_values = _read_config_file(values["config"], required=sources["config"] != "default")

    for field in SETTINGS_FIELDS:
        if field.name != "config":
            values[field.name], sources[field.name] = _resolve(field, flags, env, file_values, values["config"])
    settings = Settings(**values)
    try:
        settings.training_hosts()
    except ValueError as error:
        raise ConfigError(f"{error} (train_hosts from {sources['train_hosts']})") from None
    return settings, sources


def format_settings(settings: Settings, sources: Mapping[str, str]) -> str:
    """The effective settings as TOML lines (pasteable into config.toml) with their source; api_key masked."""
    found = "" if settings.config.exists() else ", no such file"
    rows = [(f"# config file: {settings.config}", sources.get("config", "default") + found)]
    for field in SETTINGS_FIELDS:
        value = getattr(settings, field.name)
        source = sources.get(field.name, "default")
        if not field.in_file:
            continue
        if value is None:
            rows.append((f"# {field.name} = (not set)", source))
        else:
            rows.append((f"{field.name} = {_display(field, value)}", source))
    width = max(len(text) for text, _ in rows)
    return "\n".join(f"{text:<{width}}  # {source}" for text, source in rows)


def _flag_values(cli_args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    raw = vars(cli_args) if isinstance(cli_args, argparse.Namespace) else dict(cli_args or {})
    return {name: value for name, value in raw.items() if name in FIELDS_BY_NAME and value is not None}


def _resolve(
    field: SettingField,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    config: Path | None,
) -> tuple[Any, str]:
    if field.name in flags:
        source = f"flag {field.flag}"
        return _convert(field, flags[field.name], source, base_dir=Path.cwd()), source
    if field.env in env:
        source = f"env {field.env}"
        return _convert(field, env[field.env], source, base_dir=Path.cwd()), source
    if field.name in file_values and config is not None:
        source = f"config file {config}"
        return _convert(field, file_values[field.name], source, base_dir=config.parent), source
    default = field.default() if callable(field.default) else field.default
    return default, "default"


def _read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: invalid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it: {error.strerror}") from None
    known = [f.name for f in SETTINGS_FIELDS if f.in_file]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known settings: {', '.join(known)}"
            raise ConfigError(f"config file {path}: unknown setting '{key}'{hint}")
    return data


# --- conversion ---------------------------------------------------------------------------------------------


def _convert(field: SettingField, raw: Any, source: str, *, base_dir: Path) -> Any:
    """Turn a flag/env string or a TOML value into the setting's type, or raise a ConfigError naming both."""
    where = _where(field, source)
    from_text = isinstance(raw, str) and not source.startswith("config file")
    if field.optional and (raw == "" or (field.type == "cron or none" and str(raw).lower() in ("none", "off"))):
        return None
    converter = _CONVERTERS[field.type.removesuffix(" or none")]
    try:
        value = converter(field, raw, from_text, base_dir)
    except _BadValue as error:
        raise ConfigError(f"{where}: expected {error.args[0]}, got {raw!r}") from None
    if field.minimum is not None and value < field.minimum:
        raise ConfigError(f"{where}: must be at least {field.minimum:g}, got {raw!r}")
    if field.maximum is not None and value > field.maximum:
        raise ConfigError(f"{where}: must be at most {field.maximum:g}, got {raw!r}")
    return value


class _BadValue(Exception):
    """Raised by a converter with the expectation, e.g. 'an integer'."""


def _where(field: SettingField, source: str) -> str:
    if source.startswith("env "):
        return field.env
    if source.startswith("flag "):
        return field.flag
    if source.startswith("config file "):
        return f"{source}: {field.name}"
    return field.name


def _to_string(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _BadValue("a non-empty string")
    return raw


def _to_integer(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if from_text and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return int(raw)
    raise _BadValue("an integer")


def _to_number(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if from_text:
        try:
            return float(raw)
        except ValueError:
            pass
    raise _BadValue("a number")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MiB, "mb": 10**6, "mib": MiB}
_SIZE_UNITS |= {"g": 1024 * MiB, "gb": 10**9, "gib": 1024 * MiB}


def _to_size(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> int:
    """Bytes, from an integer or a string such as '512MiB', '1.5 GB' or '64k' (k/m/g are binary)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", raw) if isinstance(raw, str) else None
    if match and match.group(2).lower() in _SIZE_UNITS:
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise _BadValue("a size in bytes such as 1048576, '512MiB' or '1GB'")


def _to_path(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> Path:
    """An absolute path; relative paths in the config file are relative to the file's directory."""
    if not isinstance(raw, str) or not raw.strip():
        raise _BadValue("a path")
    return (base_dir / Path(raw).expanduser()).resolve()


def _to_list(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> tuple[str, ...]:
    if from_text:
        items = [item.strip() for item in raw.split(",")]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = [item.strip() for item in raw]
    else:
        raise _BadValue("a list of strings")
    if not items or not all(items):
        raise _BadValue("a non-empty, comma-separated list" if from_text else "a non-empty list of strings")
    return tuple(items)


def _to_choice(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> str:
    if isinstance(raw, str) and raw.strip().lower() in field.choices:
        return raw.strip().lower()
    raise _BadValue("one of " + ", ".join(field.choices))


def _to_cron(field: SettingField, raw: Any, from_text: bool, base_dir: Path) -> str:
    """A standard 5-field crontab line; the scheduler parses the fields themselves."""
    if isinstance(raw, str) and len(raw.split()) == 5:
        return " ".join(raw.split())
    raise _BadValue("a 5-field cron expression such as '0 3 * * *', or 'none'")


_CONVERTERS: dict[str, Callable[[SettingField, Any, bool, Path], Any]] = {
    "string": _to_string,
    "integer": _to_integer,
    "number": _to_number,
    "size": _to_size,
    "path": _to_path,
    "list": _to_list,
    "choice": _to_choice,
    "cron": _to_cron,
}


def _display(field: SettingField, value: Any) -> str:
    """A value as TOML that :func:`load_settings` reads back; sizes in binary units, the API key masked."""
    if field.name == "api_key":
        return '"********"'
    if field.type == "size":
        for unit, factor in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
            if value % factor == 0:
                return f'"{value // factor}{unit}"'
    return _toml_literal(value)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
