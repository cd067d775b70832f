"""Soak: 8 streaming clients on the real default base for N minutes while 20 adapter versions are registered,
promoted and rolled back under them, and half the clients hang up mid-stream at random.

Run with ``.venv/bin/python bench/soak.py [--minutes 3]``. It reports, for one run on this machine:

- failed requests (goal 0): any answer but a complete 200 stream, other than the hang-ups the clients chose;
- the inter-token gap (p50 and p99, ms) the streaming clients saw while versions changed under them;
- leaked batch slots (goal 0): sequences ``/health`` still counts as running once every client is gone;
- the daemon's resident memory at the start (after a warm-up) and at the end.

The adapters are random LoRAs (``bench/adapters.py``'s ``make_adapters``), versions 1–20 of one name, ``soak``;
the clients ask for ``soak`` (whatever version is promoted at that moment), ``soak@1`` and the base.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base, serve  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

CLIENTS = 8
VERSIONS = 20
MAX_TOKENS = 24
PROMPTS = (
    "Write a short story about a river that learns to sing.",
    "Explain how a bicycle stays upright.",
    "What should I cook for dinner tonight?",
    "Describe the water cycle in three sentences.",
)


def _bench_adapters():
    """``bench/adapters.py`` by path (a plain ``import adapters`` would find the repository's ``adapters/``)."""
    spec = importlib.util.spec_from_file_location("bench_adapters", Path(__file__).with_name("adapters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlx_mib(url: str) -> dict[str, float]:
    """MLX's active and cached bytes in the daemon, from its /metrics."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("solverx_mlx_active_bytes", "solverx_mlx_cache_bytes", "solverx_prompt_cache_bytes"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name.removeprefix("solverx_").removesuffix("_bytes") + "_mib"] = round(
                    float(line.split()[-1]) / 2**20, 1
                )
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Tally:
    completed: int = 0
    hung_up: int = 0
    failures: list[str] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    admin: list[str] = field(default_factory=list)


async def stream_once(client, body: dict, hang_up_after: int | None, tally: Tally) -> None:
    """One streamed chat; ``hang_up_after`` content chunks, then close the connection (None: read to the end)."""
    chunks, last, finished = 0, None, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                tally.failures.append(f"{body['model']}: HTTP {response.status_code} {await response.aread()!r}")
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                    break
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.failures.append(f"{body['model']}: error event {chunk['error']}")
                    return
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is not None:
                        tally.gaps_ms.append((now - last) * 1000)
                    last, chunks = now, chunks + 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        tally.hung_up += 1
                        return  # leaving the block closes the connection mid-stream
    except Exception as exc:
        tally.failures.append(f"{body['model']}: {type(exc).__name__}: {exc}")
        return
    if finished:
        tally.completed += 1
    else:
        tally.failures.append(f"{body['model']}: the stream ended without [DONE]")


async def client_loop(url: str, index: int, deadline: float, base_id: str, tally: Tally) -> None:
    import httpx

    rng = random.Random(index)
    hangs_up = index % 2 == 1  # half the clients disconnect at random
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            model = rng.choice(["soak", "soak", "soak@1", base_id])
            body = {
                "model": model,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.7,
                "stream": True,
                "ignore_eos": True,
            }
            await stream_once(client, body, rng.randint(1, MAX_TOKENS - 1) if hangs_up else None, tally)


async def admin_loop(url: str, adapters: list[Path], deadline: float, tally: Tally) -> None:
    """Versions 2..20 registered and promoted at even intervals; every fourth is rolled back right after."""
    import httpx

    pause = max(0.5, (deadline - time.monotonic()) / len(adapters))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i, path in enumerate(adapters[1:], 2):
            await asyncio.sleep(pause)
            response = await client.post("/v1/adapters", json={"name": "soak", "path": str(path), "promote": True})
            tally.admin.append(f"register v{i}: {response.status_code}")
            if response.status_code != 201:
                tally.failures.append(f"register v{i}: HTTP {response.status_code} {response.text}")
            if i % 4 == 0:
                response = await client.post("/v1/adapters/soak/rollback")
                tally.admin.append(f"rollback after v{i}: {response.status_code}")
                if response.status_code != 200:
                    tally.failures.append(f"rollback after v{i}: HTTP {response.status_code} {response.text}")


async def soak(url: str, adapters: list[Path], minutes: float, base_id: str) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + minutes * 60
    await asyncio.gather(
        admin_loop(url, adapters, deadline, tally),
        *[client_loop(url, i, deadline, base_id, tally) for i in range(CLIENTS)],
    )
    return tally


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    ensure_openblas()
    import httpx

    bench = _bench_adapters()
    model_dir, base_id = real_base()
    with tempfile.TemporaryDirectory(prefix="solverx-soak-") as tmp:
        adapters = bench.make_adapters(model_dir, Path(tmp) / "adapters", VERSIONS)
        with serve(model_dir, base_id, "--max-resident-adapters", "2") as daemon:
            url = daemon.url
            first = httpx.post(url + "/v1/adapters", json={"name": "soak", "path": str(adapters[0]), "promote": True})
            first.raise_for_status()
            warm = {"model": "soak", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            httpx.post(url + "/v1/chat/completions", json=warm, timeout=120).raise_for_status()
            rss_start, memory_start = rss_mib(daemon.process.pid), mlx_mib(url)
            started = time.monotonic()
            tally = asyncio.run(soak(url, adapters, args.minutes, base_id))
            elapsed = time.monotonic() - started
            time.sleep(1.0)  # hung-up streams are noticed at their next token
            health = httpx.get(url + "/health", timeout=10).json()
            rss_end, memory_end = rss_mib(daemon.process.pid), mlx_mib(url)

    report = {
        "minutes": round(elapsed / 60, 2),
        "clients": CLIENTS,
        "versions_registered": VERSIONS,
        "completed_streams": tally.completed,
        "hung_up_streams": tally.hung_up,
        "failed_requests": len(tally.failures),
        "inter_token_gap_ms_p50": round(percentile(tally.gaps_ms, 50), 1),
        "inter_token_gap_ms_p99": round(percentile(tally.gaps_ms, 99), 1),
        "leaked_slots": health["running"] + health["waiting"],
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_end": round(rss_end, 1),
        "mlx_memory_start": memory_start,
        "mlx_memory_end": memory_end,
    }
    print(json.dumps(report, indent=2))
    for failure in tally.failures[:20]:
        print("FAILED:", failure)
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps({**report, "admin": tally.admin, "failures": tally.failures}, indent=2))
    sys.exit(1 if tally.failures or report["leaked_slots"] else 0)


if __name__ == "__main__":
    main()
