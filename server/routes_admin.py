"""Adapter administration over HTTP: register, promote, roll back, remove, inspect.

Registry writes copy and fsync files, so they run in a worker thread and never stall generation. The
registry validates every adapter against the served base before it exists as a version, so a bad adapter is
refused here with a 4xx and is never served. vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
are accepted too, so tools written for vLLM work unchanged.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from solverx.adapters.errors import AdapterError, InvalidAdapterName
from solverx.adapters.facts import FactsError, retrieve_for_version
from solverx.adapters.names import parse_model_name, validate_name
from solverx.adapters.registry import Registry, VersionInfo
from solverx.server.body import read_json
from solverx.server.errors import InvalidRequest, ModelNotFound, ServiceUnavailable, to_api_error
from solverx.server.state import server_state


def _registry(request: Request) -> Registry:
    registry = server_state(request).registry
    if registry is None:
        raise ServiceUnavailable("This server has no adapter registry.")
    return registry


def _version_dict(info: VersionInfo) -> dict[str, Any]:
    data = asdict(info)
    data["path"] = str(info.path)
    data["id"] = info.model_name
    return data


def _field(body: Any, name: str, kind: type, required: bool = True) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    value = body.get(name)
    if value is None and not required:
        return None
    if value is None or not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidRequest(f"`{name}` is required and must be a {kind.__name__}.", param=name)
    return value


def _base_for(request: Request, base_id: str | None):
    """The engine an adapter is registered against: the named base, else the default (first) one."""
    engines = server_state(request).catalog.engines
    if base_id is None:
        return next(iter(engines.values()))
    if base_id not in engines:
        raise ModelNotFound(f"The base model `{base_id}` is not served here.", param="base_model")
    return engines[base_id]


async def _register(
    request: Request,
    name: str,
    path: str,
    promote: bool,
    base_id: str | None,
    params: tuple[str, str] = ("name", "path"),
) -> VersionInfo:
    """Register ``path`` as the next version of ``name``. ``params`` are the body fields holding the name and
    the path (vLLM's form calls them ``lora_name``/``lora_path``): errors name the field the caller got wrong."""
    name_param, path_param = params
    registry = _registry(request)
    try:  # the name first: `../evil` is refused as a name whatever the path
        validate_name(name)
    except InvalidAdapterName as exc:
        raise InvalidRequest(str(exc), param=name_param, code=exc.code) from exc
    if name in server_state(request).catalog.engines:
        # A base id wins model-name resolution, so such an adapter could never be selected by name, and
        # /v1/models would list the id twice.
        raise InvalidRequest(
            f"`{name}` is the id of a base model served here; choose another adapter name.",
            param=name_param,
            code="invalid_name",
        )
    source = Path(path).expanduser()
    if not source.is_dir():
        raise InvalidRequest(f"No adapter directory at `{path}`.", param=path_param)
    engine = _base_for(request, base_id)
    try:
        return await run_in_threadpool(
            registry.register,
            source,
            name,
            base_id=engine.base_id,
            base_dir=engine.model_dir,
            stage="imported",
            promote=promote,
        )
    except AdapterError as exc:  # a refused adapter is the fault of the files at `path`, not of a `model` field
        raise to_api_error(exc, param=path_param) from exc


async def register_adapter(request: Request) -> Response:
    """``POST /v1/adapters {"name", "path", "promote": true, "base_model"?}`` → the new version."""
    body = await read_json(request, server_state(request).max_body_bytes)
    promote = body.get("promote", True) if isinstance(body, dict) else True
    if not isinstance(promote, bool):
        raise InvalidRequest("`promote` must be a boolean.", param="promote")
    info = await _register(
        request, _field(body, "name", str), _field(body, "path", str), promote, _field(body, "base_model", str, False)
    )
    return JSONResponse(_version_dict(info), status_code=201)


async def load_lora_adapter(request: Request) -> Response:
    """vLLM's form: ``{"lora_name", "lora_path"}`` registers and promotes."""
    body = await read_json(request, server_state(request).max_body_bytes)
    name, path = _field(body, "lora_name", str), _field(body, "lora_path", str)
    info = await _register(request, name, path, True, None, params=("lora_name", "lora_path"))
    return JSONResponse(_version_dict(info), status_code=201)


async def unload_lora_adapter(request: Request) -> Response:
    """vLLM's form: ``{"lora_name"}`` removes the adapter (every version)."""
    body = await read_json(request, server_state(request).max_body_bytes)
    name, version = parse_model_name(_field(body, "lora_name", str))
    await run_in_threadpool(_registry(request).remove, name, version)
    return JSONResponse({"removed": _field(body, "lora_name", str)})


async def list_adapters(request: Request) -> Response:
    registry = _registry(request)
    data = [
        {"name": name, "versions": [_version_dict(v) for v in registry.versions(name)]} for name in registry.names()
    ]
    return JSONResponse({"object": "list", "data": data})


async def show_adapter(request: Request) -> Response:
    """Versions, lineage, status and eval reports of one adapter."""
    name, version = parse_model_name(request.path_params["name"])
    registry = _registry(request)
    if version is not None:
        return JSONResponse(_version_dict(registry.resolve(name, version)))
    versions = registry.versions(name)
    if not versions:
        raise ModelNotFound.for_model(name)
    promoted = registry.promoted(name)
    return JSONResponse(
        {
            "name": name,
            "promoted": promoted.version if promoted else None,
            "versions": [_version_dict(v) for v in versions],
        }
    )


async def adapter_facts(request: Request) -> Response:
    """What grounding would put in the prompt for ``?query=`` on a version (the promoted one unless ``@N``)."""
    name, version = parse_model_name(request.path_params["name"])
    query = request.query_params.get("query", "")
    if not query.strip():
        raise InvalidRequest("`query` is required: the question to retrieve facts for.", param="query")
    top_k = request.query_params.get("top_k")
    if top_k is not None and not (top_k.isdigit() and 1 <= int(top_k) <= 32):
        raise InvalidRequest("`top_k` must be a whole number from 1 to 32.", param="top_k")
    registry = _registry(request)
    info = registry.resolve(name, version)
    try:
        facts = await run_in_threadpool(retrieve_for_version, info.path, info.recipe, query, int(top_k or 0) or None)
    except FactsError as exc:
        raise ModelNotFound(f"`{info.model_name}` has no fact graph ({exc}).", param="name") from None
    return JSONResponse({"object": "list", "model": info.model_name, "data": [f.to_dict() for f in facts]})


async def promote_adapter(request: Request) -> Response:
    """``POST /v1/adapters/{name}/promote {"version": N}``; ``{name}@N`` in the path works too."""
    name, version = parse_model_name(request.path_params["name"])
    if version is None:
        body = await read_json(request, server_state(request).max_body_bytes)
        version = _field(body, "version", int)
    info = await run_in_threadpool(_registry(request).promote, name, version)
    return JSONResponse(_version_dict(info))


async def rollback_adapter(request: Request) -> Response:
    """``POST /v1/adapters/{name}/rollback [{"version": N}]`` → back to N, or to the previously promoted one."""
    name, _ = parse_model_name(request.path_params["name"])
    raw = await request.body()
    to = None
    if raw.strip():
        body = await read_json(request, server_state(request).max_body_bytes)
        to = _field(body, "version", int, required=False)
    info = await run_in_threadpool(_registry(request).rollback, name, to)
    return JSONResponse(_version_dict(info))


async def delete_adapter(request: Request) -> Response:
    """``DELETE /v1/adapters/{name}`` removes every version; ``{name}@N`` removes one."""
    name, version = parse_model_name(request.path_params["name"])
    await run_in_threadpool(_registry(request).remove, name, version)
    return JSONResponse({"removed": request.path_params["name"]})


routes = [
    Route("/v1/adapters", register_adapter, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters/{name}", show_adapter, methods=["GET"]),
    Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
    Route("/v1/adapters/{name}/facts", adapter_facts, methods=["GET"]),
    Route("/v1/adapters/{name}/promote", promote_adapter, methods=["POST"]),
    Route("/v1/adapters/{name}/rollback", rollback_adapter, methods=["POST"]),
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
