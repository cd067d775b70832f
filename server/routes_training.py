"""Training over HTTP: see queued, running and finished runs; start one; cancel one.

``GET /v1/training`` is what ``solverx status`` and the dashboard show: each run's state, live progress
(step, loss, tok/s, ETA), what was quarantined and why, and the gate's verdict.
"""

from __future__ import annotations

from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from solverx.server.body import read_json
from solverx.server.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from solverx.server.state import server_state
from solverx.server.training import TrainingService


def _manager(request: Request) -> TrainingService:
    manager = server_state(request).training
    if manager is None:
        raise ServiceUnavailable("Training is not enabled on this server.")
    return manager


async def list_runs(request: Request) -> Response:
    manager = _manager(request)
    runs = [asdict(summary) for summary in manager.runs()]
    queued = [entry.run_id for entry in manager.queued]
    return JSONResponse({"object": "list", "queued": queued, "data": runs})


async def start_run(request: Request) -> Response:
    """``POST /v1/training {"adapter": "solverx"}`` queues a run of that adapter's inbox."""
    body = await read_json(request, server_state(request).max_body_bytes)
    adapter = body.get("adapter") if isinstance(body, dict) else None
    if not isinstance(adapter, str):
        raise InvalidRequest("`adapter` is required and must be a string.", param="adapter")
    manager = _manager(request)
    if manager.inbox_path(adapter) is None:
        raise InvalidRequest(f"There is no inbox folder for `{adapter}`.", param="adapter")
    entry = manager.request(adapter, "api", no_replay=bool(body.get("no_replay", False)))
    return JSONResponse({"run_id": entry.run_id, "adapter": entry.adapter, "state": "queued"}, status_code=202)


async def cancel_run(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    if not await _manager(request).cancel(run_id):
        raise ModelNotFound(f"No queued or running training run `{run_id}`.", param="run_id", code="run_not_found")
    return JSONResponse({"run_id": run_id, "state": "cancelled"})


routes = [
    Route("/v1/training", list_runs, methods=["GET"]),
    Route("/v1/training", start_run, methods=["POST"]),
    Route("/v1/training/{run_id}", cancel_run, methods=["DELETE"]),
]
