"""Multi-turn: a chat's second turn, which repeats the first turn's messages, with and without the prompt cache.

Run with ``.venv/bin/python bench/prefix_cache.py``. Measured side by side in one run on the real default base,
the daemon started twice (``prompt_cache_bytes`` at its default, then 0): each time the first turn (a ~1,000-token
message) and the second turn (the first turn's messages, its answer and a short question) are sent as streams, and
their time to first token is printed, with second ÷ first (goal <= 0.3 with the cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base, serve  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

PARAGRAPH = (
    "Our lighthouse stands on a granite point at the mouth of the bay. Its lamp turns every twelve seconds, and "
    "the keeper logs each ship that passes, the weather, and the height of the waves at dawn and at dusk. "
)


def turn(url: str, model: str, messages: list[dict]) -> tuple[float, str]:
    """(seconds to the first content token, the whole answer) of one streamed chat turn."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True}
    started, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    first = first or time.perf_counter() - started
                    text.append(choice["delta"]["content"])
    return first or float("nan"), "".join(text)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    ensure_openblas()
    model_dir, base_id = real_base()
    opening = [{"role": "user", "content": PARAGRAPH * 24 + "What does the keeper write down?"}]
    results = {}
    for label, cache in (("with the prompt cache", "256MiB"), ("without", "0")):
        with serve(model_dir, base_id, "--prompt-cache-bytes", cache) as daemon:
            first, answer = turn(daemon.url, base_id, opening)
            follow_up = [*opening, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
            second, reply = turn(daemon.url, base_id, follow_up)
        results[label] = (first, second, reply)
        print(f"{label}: first turn TTFT {first:.2f} s, second turn {second:.2f} s, ratio {second / first:.3f}")
    assert results["with the prompt cache"][2] == results["without"][2], "the cache changed the answer"
    print("same second-turn answer with and without the cache")


if __name__ == "__main__":
    main()
