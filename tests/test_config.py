"""Settings resolve as documented: flag > env > config file > default, each value reports its source,
bad values and unknown keys fail with a message naming the setting and where it came from."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

import pytest

from solverx.config import (
    SETTINGS_FIELDS,
    ConfigError,
    MiB,
    Settings,
    add_arguments,
    default_config_path,
    format_settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real user's config file and data dir out of every test."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user" / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user" / ".local" / "share"))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="solverx serve")
    add_arguments(parser)
    return parser.parse_args(argv)


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_set() -> None:
    settings, sources = load_settings(parse(), env={})

    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.api_key is None
    assert settings.default_model is None  # the first base served
    assert settings.base_models == ("smollm2-135m-instruct",)  # the real default, imported from its PyPI wheel
    assert settings.max_resident_adapters == 8
    assert settings.max_adapter_bytes == 512 * MiB
    assert settings.train_schedule is None
    assert settings.train_debounce_seconds == 10
    assert settings.training_exclusive == "auto"
    assert settings.log_level == "info"
    assert settings.max_tokens_cap == 4096
    assert settings.max_body_bytes == 1 * MiB
    assert settings.home.name == "solverx" and settings.home.is_absolute()
    assert settings.config == default_config_path()
    assert default_config_path().parts[-2:] == ("solverx", "config.toml")
    assert set(sources.values()) == {"default"}


def test_every_setting_has_a_flag_an_env_var_and_help() -> None:
    assert [f.name for f in SETTINGS_FIELDS] == [f.name for f in dataclasses.fields(Settings)]
    flags = vars(parse())
    for field in SETTINGS_FIELDS:
        assert field.env == "SOLVERX_" + field.name.upper()
        assert field.flag == "--" + field.name.replace("_", "-")
        assert flags[field.name] is None  # an absent flag must not override env or file
        assert field.help


@pytest.mark.parametrize(
    ("name", "file_value", "env_value", "flag_value", "expected"),
    [
        ("port", "9001", "9002", "9003", (9001, 9002, 9003, 8080)),
        ("host", '"10.0.0.1"', "10.0.0.2", "10.0.0.3", ("10.0.0.1", "10.0.0.2", "10.0.0.3", "127.0.0.1")),
        ("base_models", '["a", "b"]', "c, d", "e", (("a", "b"), ("c", "d"), ("e",), ("smollm2-135m-instruct",))),
        ("max_body_bytes", '"2MiB"', "3MiB", "4194304", (2 * MiB, 3 * MiB, 4 * MiB, MiB)),
        ("training_exclusive", '"never"', "Always", "auto", ("never", "always", "auto", "auto")),
        ("train_debounce_seconds", "2.5", "3", "0", (2.5, 3.0, 0.0, 10.0)),
    ],
)
def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, name: str, file_value: str, env_value: str, flag_value: str, expected: tuple
) -> None:
    config = write_config(tmp_path / "config.toml", f"{name} = {file_value}\n")
    field = next(f for f in SETTINGS_FIELDS if f.name == name)
    env = {"SOLVERX_CONFIG": str(config), field.env: env_value}
    from_file, from_env, from_flag, default = expected

    settings, sources = load_settings(parse(field.flag, flag_value), env=env)
    assert (getattr(settings, name), sources[name]) == (from_flag, f"flag {field.flag}")

    settings, sources = load_settings(parse(), env=env)
    assert (getattr(settings, name), sources[name]) == (from_env, f"env {field.env}")

    settings, sources = load_settings(parse(), env={"SOLVERX_CONFIG": str(config)})
    assert (getattr(settings, name), sources[name]) == (from_file, f"config file {config}")

    settings, sources = load_settings(parse(), env={})
    assert (getattr(settings, name), sources[name]) == (default, "default")


def test_sources_are_reported_per_setting(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", 'log_level = "debug"\nmax_tokens_cap = 256\n')
    settings, sources = load_settings(
        {"port": "7000", "max_tokens_cap": "512"}, env={"SOLVERX_HOST": "0.0.0.0"}, config_path=config
    )

    assert (settings.port, settings.host, settings.log_level, settings.max_tokens_cap) == (
        7000,
        "0.0.0.0",
        "debug",
        512,
    )
    assert sources["port"] == "flag --port"
    assert sources["host"] == "env SOLVERX_HOST"
    assert sources["log_level"] == f"config file {config}"
    assert sources["max_tokens_cap"] == "flag --max-tokens-cap"
    assert sources["default_model"] == "default"
    assert set(sources) == {f.name for f in SETTINGS_FIELDS}


def test_config_file_location(tmp_path: Path) -> None:
    by_env = write_config(tmp_path / "env.toml", "port = 1111\n")
    by_flag = write_config(tmp_path / "flag.toml", "port = 2222\n")
    by_arg = write_config(tmp_path / "arg.toml", "port = 3333\n")
    default = write_config(default_config_path(), "port = 4444\n")
    env = {"SOLVERX_CONFIG": str(by_env)}

    assert load_settings(parse(), env={})[0].port == 4444
    assert load_settings(parse(), env=env)[0].port == 1111
    settings, sources = load_settings(parse("--config", str(by_flag)), env=env)
    assert (settings.port, settings.config, sources["config"]) == (2222, by_flag, "flag --config")
    assert load_settings(parse("--config", str(by_flag)), env=env, config_path=by_arg)[0].port == 3333

    default.unlink()
    assert load_settings(parse(), env={})[0].port == 8080  # a missing default file is fine
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_settings(parse(), env={"SOLVERX_CONFIG": str(tmp_path / "nope.toml")})


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "etc" / "config.toml", 'home = "../state"\n')
    assert load_settings(parse(), env={}, config_path=config)[0].home == tmp_path / "state"
    home = load_settings(parse(), env={"SOLVERX_HOME": "~/elsewhere"}, config_path=config)[0].home
    assert home == tmp_path / "user" / "elsewhere"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {"SOLVERX_PORT": "abc"}, "SOLVERX_PORT: expected an integer, got 'abc'"),
        (("--port", "8o8o"), {}, "--port: expected an integer, got '8o8o'"),
        ((), {"SOLVERX_PORT": "70000"}, "SOLVERX_PORT: must be at most 65535, got '70000'"),
        (("--max-resident-adapters", "0"), {}, "--max-resident-adapters: must be at least 1, got '0'"),
        ((), {"SOLVERX_MAX_ADAPTER_BYTES": "lots"}, "SOLVERX_MAX_ADAPTER_BYTES: expected a size in bytes"),
        ((), {"SOLVERX_TRAINING_EXCLUSIVE": "maybe"}, "expected one of auto, always, never, got 'maybe'"),
        ((), {"SOLVERX_LOG_LEVEL": "loud"}, "SOLVERX_LOG_LEVEL: expected one of debug, info"),
        (("--train-schedule", "3am"), {}, "--train-schedule: expected a 5-field cron expression"),
        ((), {"SOLVERX_TRAIN_DEBOUNCE_SECONDS": "soon"}, "SOLVERX_TRAIN_DEBOUNCE_SECONDS: expected a number"),
        (
            (),
            {"SOLVERX_BASE_MODELS": "a,,b"},
            "SOLVERX_BASE_MODELS: expected a non-empty, comma-separated list",
        ),
        (("--host", ""), {}, "--host: expected a non-empty string, got ''"),
    ],
)
def test_bad_values_name_the_setting_and_source(argv: tuple[str, ...], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(parse(*argv), env=env)
    assert message in str(error.value)


def test_bad_values_in_the_file_name_the_file_and_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", 'port = "8080"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(parse(), env={}, config_path=config)
    assert str(error.value) == f"config file {config}: port: expected an integer, got '8080'"

    write_config(config, "base_models = [1, 2]\n")
    with pytest.raises(ConfigError, match="base_models: expected a list of strings"):
        load_settings(parse(), env={}, config_path=config)

    write_config(config, "port = \n")
    with pytest.raises(ConfigError, match=r"config\.toml: invalid TOML: "):
        load_settings(parse(), env={}, config_path=config)


def test_a_bad_value_that_is_overridden_still_fails_only_where_read(tmp_path: Path) -> None:
    """The file is validated as a whole for unknown keys, but an overridden value is not converted."""
    config = write_config(tmp_path / "config.toml", 'port = "x"\n')
    assert load_settings(parse("--port", "9"), env={}, config_path=config)[0].port == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 8080\n", "unknown setting 'prot' (did you mean 'port'?)"),
        ("max-body-bytes = 1\n", "unknown setting 'max-body-bytes' (did you mean 'max_body_bytes'?)"),
        ('config = "other.toml"\n', "unknown setting 'config'"),
        ("[server]\nport = 1\n", "unknown setting 'server'"),
    ],
)
def test_unknown_keys_in_the_file_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    config = write_config(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError) as error:
        load_settings(parse(), env={}, config_path=config)
    assert str(error.value).startswith(f"config file {config}: {message}")


def test_optional_settings_can_be_cleared_from_env(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", 'api_key = "k"\ntrain_schedule = "0 3 * * *"\n')
    settings, _ = load_settings(parse(), env={}, config_path=config)
    assert (settings.api_key, settings.train_schedule) == ("k", "0 3 * * *")

    env = {"SOLVERX_API_KEY": "", "SOLVERX_TRAIN_SCHEDULE": "none"}
    settings, sources = load_settings(parse(), env=env, config_path=config)
    assert (settings.api_key, settings.train_schedule) == (None, None)
    assert sources["train_schedule"] == "env SOLVERX_TRAIN_SCHEDULE"


def test_format_settings_masks_the_api_key_and_shows_sources(tmp_path: Path) -> None:
    settings, sources = load_settings(
        parse("--port", "9000"), env={"SOLVERX_API_KEY": "sk-very-secret-123"}, config_path=None
    )
    shown = format_settings(settings, sources)

    assert "sk-very-secret-123" not in shown and "secret" not in shown
    lines = {line.split(" = ")[0]: line for line in shown.splitlines()}
    assert '"********"' in lines["api_key"] and "# env SOLVERX_API_KEY" in lines["api_key"]
    assert "port = 9000" in lines["port"] and "# flag --port" in lines["port"]
    assert "# default" in lines["host"]
    assert f"# config file: {default_config_path()}" in shown and "no such file" in shown
    assert "# train_schedule = (not set)" in shown


def test_format_settings_output_is_a_config_file_that_reads_back(tmp_path: Path) -> None:
    original, sources = load_settings(
        parse("--max-body-bytes", "2MiB", "--base-models", "a,b", "--train-schedule", "*/5 * * * *"),
        env={"SOLVERX_HOME": str(tmp_path / "state"), "SOLVERX_API_KEY": "k"},
    )
    config = write_config(tmp_path / "shown.toml", format_settings(original, sources))
    assert "api_key" in tomllib.loads(config.read_text())

    reread, reread_sources = load_settings(parse(), env={}, config_path=config)
    assert dataclasses.replace(reread, api_key="k", config=original.config) == original
    assert reread_sources["port"] == f"config file {config}"
