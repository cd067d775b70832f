"""End-to-end test helpers: run the real daemon as a subprocess, check bodies against OpenAI's spec.

The server gets its own state directory whose ``models/solverx-tiny`` links to the tiny model the test session
already built, and serves that directory, so it starts in seconds and never rebuilds the model itself. Its
stdout and stderr go to ``server.log`` there; a server that dies or never answers ``/health`` fails the test
with the log's last lines.

:class:`OpenAPISchemas` validates response bodies against ``components/schemas`` of OpenAI's published OpenAPI
document, the contract every OpenAI client is generated from.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import referencing
import yaml
from referencing.jsonschema import DRAFT202012

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_BASE_ID = "solverx-tiny"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
_KEPT_ENV = ("SOLVERX_NO_OPENBLAS",)  # every other SOLVERX_* variable is a setting the test must not inherit


@dataclass(frozen=True)
class Daemon:
    """A running server: ``base_url`` is ``http://127.0.0.1:PORT`` (the OpenAI API is under ``/v1``)."""

    base_url: str
    home: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def link_model(home: Path, model_dir: Path, base_id: str = TINY_BASE_ID) -> Path:
    """Make ``model_dir`` the server's ``models/<base_id>`` without copying its weights."""
    target = home / "models" / base_id
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    return target


@contextlib.contextmanager
def serve_daemon(
    home: Path, model_dir: Path | None = None, extra_args: tuple[str, ...] = (), base_id: str = TINY_BASE_ID
) -> Iterator[Daemon]:
    """Start ``solverx serve`` on a free loopback port, wait until ``/health`` answers, stop it on exit.

    ``extra_args`` are more ``solverx serve`` flags, e.g. ``("--api-key", "k")``.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    if model_dir is not None:  # named as a directory, so the server never starts a rebuild of its own
        extra_args = ("--base-models", str(link_model(home, model_dir, base_id)), *extra_args)
    port = free_port()
    config = home / "config.toml"  # an empty file of our own, so a developer's config never leaks in
    config.touch()
    command = [sys.executable, "-m", "solverx", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--home", str(home), "--config", str(config), *extra_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_") or k in _KEPT_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log_path = home / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = Daemon(f"http://127.0.0.1:{port}", home, log_path, process)
    try:
        _wait_ready(daemon)
        yield daemon
    finally:
        _stop(process)


def _wait_ready(daemon: Daemon) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"the server exited with {daemon.process.returncode}:\n{_tail(daemon)}")
        with contextlib.suppress(httpx.TransportError):
            # uvicorn binds only after startup, so any answer means ready (401: an API key is configured)
            if httpx.get(daemon.base_url + "/health", timeout=2).status_code in (200, 401):
                return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {START_TIMEOUT_S:.0f} s:\n{_tail(daemon)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, as a service manager would; the server shuts down gracefully. Kill it if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(daemon: Daemon, lines: int = 40) -> str:
    try:
        return "\n".join(daemon.log().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class OpenAPISchemas:
    """Validators for the spec's named schemas; ``$ref`` resolves inside the document through a registry."""

    URI = "urn:openai:openapi"

    def __init__(self, spec: dict):
        resource = referencing.Resource.from_contents(_nullable_to_anyof(spec), default_specification=DRAFT202012)
        self._registry = referencing.Registry().with_resource(self.URI, resource)
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    @classmethod
    def load(cls, path: Path) -> OpenAPISchemas:
        """From the full ``openapi.yaml`` or a JSON subset written by :func:`vendor_openapi_subset`."""
        with open(path, "rb") as handle:
            if path.suffix == ".json":
                return cls(json.load(handle))
            return cls(yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))

    def __call__(self, name: str, body: object) -> None:
        """Raise ``jsonschema.ValidationError`` unless ``body`` conforms to ``components/schemas/<name>``."""
        if name not in self._validators:
            schema = {"$ref": f"{self.URI}#/components/schemas/{name}"}
            self._validators[name] = jsonschema.Draft202012Validator(schema, registry=self._registry)
        self._validators[name].validate(body)


RESPONSE_SCHEMAS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "ErrorResponse",
)
VENDORED_SUBSET = Path(__file__).with_name("data") / "openai-openapi-subset.json"


def vendor_openapi_subset(spec_path: Path, out_path: Path = VENDORED_SUBSET, names=RESPONSE_SCHEMAS) -> Path:
    """Write the named schemas and every schema they reference (~30 KB of the 3 MB spec) as JSON, so the
    conformance checks can run where the full spec is not available (openai-openapi is MIT-licensed)."""
    with open(spec_path, "rb") as handle:
        schemas = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["components"]["schemas"]
    keep: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_refs(schemas[name]))
    subset = {"components": {"schemas": {name: schemas[name] for name in sorted(keep)}}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(subset, indent=1, sort_keys=True) + "\n")
    return out_path


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _nullable_to_anyof(node: object) -> object:
    """OpenAPI 3.0's ``nullable: true`` (still used in parts of the 3.1 document) as JSON Schema's anyOf-null;
    plain JSON Schema ignores ``nullable``, which would reject the nulls OpenAI itself sends."""
    if isinstance(node, list):
        return [_nullable_to_anyof(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_anyof(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node
