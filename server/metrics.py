"""``GET /metrics``: Prometheus text format from a registry of the app's own (never the process-global one).

Counted as requests happen:

- ``solverx_requests_total{route,model,status}`` and ``solverx_request_duration_seconds{route}`` — from the
  :class:`~solverx.server.logs.RequestContext` middleware; ``route`` is the matched path template, ``model`` the model a
  completion was served by (empty for other routes);
- ``solverx_prompt_tokens_total{model}``, ``solverx_completion_tokens_total{model}``,
  ``solverx_time_to_first_token_seconds{model}`` (request arrival → first text) and
  ``solverx_decode_tokens_per_second{model}`` (tokens after the first one over their time) — from
  :func:`track_generation`, which the OpenAI routes wrap around the engine's deltas.

Read at scrape time (:class:`LiveCollector`): ``solverx_sequences_running``/``_waiting{base}`` (queue depth),
``solverx_engine_up``, ``solverx_engine_decode_steps_total``, ``solverx_resident_adapters{base}`` and
``solverx_resident_adapter_bytes{base}``, ``solverx_prompt_cache_hit_tokens_total{base}`` and
``solverx_prompt_cache_bytes{base}``, ``solverx_mlx_active_bytes`` and ``solverx_mlx_cache_bytes`` (MLX's
allocator); ``solverx_training_runs{state}`` over the recent runs,
``solverx_training_queued``, and the running run's ``solverx_training_step``/``_steps_planned``/``_loss``/
``_tokens_per_second``/``_eta_seconds{run_id,adapter,stage}``. Plus the process collector (CPU, memory).

When an API key is configured, ``/metrics`` asks for it too (Prometheus sends it with ``authorization``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from solverx.server.logs import RequestRecord, request_started, set_model
from solverx.server.state import server_state

if TYPE_CHECKING:
    from solverx.engine.core import Delta, Engine
    from solverx.server.state import ServerState
    from solverx.server.training import TrainingService

__all__ = ["LiveCollector", "Metrics", "routes", "track_generation"]

log = logging.getLogger("solverx.server")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECODE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RUN_STATES = ("queued", "running", "succeeded", "rejected", "failed", "cancelled", "skipped")
RECENT_RUNS = 100  # runs counted by state at each scrape (each is one small file to read)


class Metrics:
    """The app's registry and the instruments the request path updates."""

    def __init__(self, state: ServerState):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "solverx_requests", "HTTP requests by route, model and status.", ["route", "model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "solverx_request_duration_seconds",
            "Time from request to the end of the response (streams included), by route.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "solverx_prompt_tokens", "Prompt tokens processed, by model.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "solverx_completion_tokens", "Completion tokens generated, by model.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "solverx_time_to_first_token_seconds",
            "Time from the request's arrival to its first generated text, by model.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_speed = Histogram(
            "solverx_decode_tokens_per_second",
            "Decode speed of one completion after its first token, by model.",
            ["model"],
            buckets=DECODE_BUCKETS,
            registry=r,
        )
        r.register(LiveCollector(state))
        ProcessCollector(registry=r)

    def observe_request(self, record: RequestRecord) -> None:
        """A :class:`~solverx.server.logs.RequestContext` observer."""
        self.requests.labels(record.route, record.model or "", str(record.status)).inc()
        self.request_seconds.labels(record.route).observe(record.seconds)

    async def track(self, model: str, started: float, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """``deltas`` unchanged, timing the first one and counting tokens when the completion ends (or is
        abandoned); closing this iterator closes ``deltas``, so the engine frees the batch slot as before."""
        first = last = None
        first_at = last_at = 0.0
        try:
            async with contextlib.aclosing(deltas):  # type: ignore[type-var]
                async for delta in deltas:
                    last, last_at = delta, time.perf_counter()
                    if first is None:
                        first, first_at = delta, last_at
                        self.ttft.labels(model).observe(first_at - started)
                    yield delta
        finally:
            if first is not None and last is not None:
                self.prompt_tokens.labels(model).inc(last.prompt_tokens)
                self.completion_tokens.labels(model).inc(last.completion_tokens)
                decoded = last.completion_tokens - first.completion_tokens
                if decoded > 0 and last_at > first_at:
                    self.decode_speed.labels(model).observe(decoded / (last_at - first_at))

    def exposition(self) -> bytes:
        """Every metric in Prometheus text format."""
        return generate_latest(self.registry)


def track_generation(request: Request, model: str, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """The hook the OpenAI routes call on the engine's deltas: names the request's model and measures it."""
    set_model(request, model)
    metrics: Metrics | None = server_state(request).metrics
    if metrics is None:
        return deltas
    started = request_started(request) or time.perf_counter()
    return metrics.track(model, started, deltas)


class LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: the engines' queues and adapter slots, and the training runs."""

    def __init__(self, state: ServerState):
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # registering must not touch the engines or the runs directory

    def collect(self) -> Iterator[Metric]:
        try:
            yield from _engine_metrics(self.state.engines)
        except Exception:
            log.exception("metrics: reading the engines failed")
        if self.state.training is not None:
            try:
                yield from _training_metrics(self.state.training)
            except Exception:
                log.exception("metrics: reading the training runs failed")


def _engine_metrics(engines: list[Engine]) -> Iterator[Metric]:
    labels = ["base"]
    up = GaugeMetricFamily("solverx_engine_up", "1 while the engine's thread is serving.", labels=labels)
    running = GaugeMetricFamily("solverx_sequences_running", "Sequences in the decode batch.", labels=labels)
    waiting = GaugeMetricFamily("solverx_sequences_waiting", "Sequences waiting to be prefilled.", labels=labels)
    steps = CounterMetricFamily("solverx_engine_decode_steps", "Batched decode steps run.", labels=labels)
    resident = GaugeMetricFamily("solverx_resident_adapters", "Adapter versions held in memory.", labels=labels)
    resident_bytes = GaugeMetricFamily(
        "solverx_resident_adapter_bytes", "Bytes of adapter tensors held in memory.", labels=labels
    )
    cached = CounterMetricFamily(
        "solverx_prompt_cache_hit_tokens", "Prompt tokens served from the prompt cache.", labels=labels
    )
    cache_bytes = GaugeMetricFamily("solverx_prompt_cache_bytes", "Bytes of KV cache held for prompts.", labels=labels)
    for engine in engines:
        base = [engine.base_id]
        stats = engine.stats
        up.add_metric(base, 1.0 if engine.alive else 0.0)
        running.add_metric(base, stats.running)
        waiting.add_metric(base, stats.waiting)
        steps.add_metric(base, stats.steps)
        resident.add_metric(base, len(stats.resident_adapters))
        resident_bytes.add_metric(base, stats.resident_adapter_bytes)
        cached.add_metric(base, stats.cached_prompt_tokens)
        cache_bytes.add_metric(base, stats.prompt_cache_bytes)
    yield from (up, running, waiting, steps, resident, resident_bytes, cached, cache_bytes)
    yield from _mlx_memory()


def _mlx_memory() -> Iterator[Metric]:
    """MLX's own accounting: arrays alive, and freed buffers it keeps for reuse (part of the process's RSS)."""
    import mlx.core as mx

    yield GaugeMetricFamily("solverx_mlx_active_bytes", "Bytes of MLX arrays alive.", value=mx.get_active_memory())
    yield GaugeMetricFamily(
        "solverx_mlx_cache_bytes", "Bytes of freed buffers MLX keeps for reuse.", value=mx.get_cache_memory()
    )


def _training_metrics(manager: TrainingService) -> Iterator[Metric]:
    runs = manager.runs(limit=RECENT_RUNS)
    by_state = GaugeMetricFamily(
        "solverx_training_runs", f"Training runs by state (the {RECENT_RUNS} most recent).", labels=["state"]
    )
    tally = Tally(run.state for run in runs)
    for state in sorted(set(RUN_STATES) | set(tally)):
        by_state.add_metric([state], tally.get(state, 0))
    queued = GaugeMetricFamily("solverx_training_queued", "Training runs waiting for their turn.")
    queued.add_metric([], len(manager.queued))
    yield from (by_state, queued)

    labels = ["run_id", "adapter", "stage"]
    gauges = {
        "step": GaugeMetricFamily("solverx_training_step", "The running run's current step.", labels=labels),
        "total": GaugeMetricFamily(
            "solverx_training_steps_planned", "Steps the running run's stage will take.", labels=labels
        ),
        "loss": GaugeMetricFamily("solverx_training_loss", "The running run's latest training loss.", labels=labels),
        "tokens_per_second": GaugeMetricFamily(
            "solverx_training_tokens_per_second", "The running run's training speed.", labels=labels
        ),
        "eta_seconds": GaugeMetricFamily(
            "solverx_training_eta_seconds", "Estimated time left in the running stage.", labels=labels
        ),
    }
    for run in runs:
        if run.state != "running" or not run.progress:
            continue
        values = [run.run_id, run.adapter, str(run.progress.get("stage") or run.stage or "")]
        for key, gauge in gauges.items():
            value = run.progress.get(key)
            if isinstance(value, int | float):
                gauge.add_metric(values, float(value))
    yield from gauges.values()


async def metrics_endpoint(request: Request) -> Response:
    metrics = server_state(request).metrics
    body = await run_in_threadpool(metrics.exposition)  # the collector reads the runs directory
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
