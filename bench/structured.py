"""What structured outputs cost per token: the same greedy requests with and without a JSON schema, side by side.

    python bench/structured.py [--streams 1,4] [--tokens 48]

On the real base, in one engine: each configuration decodes ``--tokens`` tokens for N concurrent requests, free
or constrained by a schema whose strings are long enough never to end before the budget (so both decode the same
number of tokens), and prints tokens per second and the per-token overhead of the mask (llguidance's bitmask,
unpacked and applied per row). Also the one-off cost: compiling a schema and building the vocabulary's view.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import real_base

SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper, as JSON."}]


async def decode(engine, params, streams: int) -> tuple[float, int]:
    tokens = engine.encode_chat(PROMPT)

    async def one() -> int:
        count = 0
        async for delta in engine.generate(tokens, params):
            count = delta.completion_tokens
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*[one() for _ in range(streams)])
    return time.perf_counter() - started, sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    from solverx.blas import ensure_openblas

    ensure_openblas()
    from solverx.engine.core import Engine, EngineConfig
    from solverx.engine.grammar import json_schema_grammar
    from solverx.engine.sampling import SamplingParams

    model_dir, base_id = real_base()
    engine = Engine(model_dir, base_id, EngineConfig(prompt_cache_bytes=0)).start()
    started = time.perf_counter()
    grammar = json_schema_grammar(SCHEMA)
    compiled = time.perf_counter() - started
    started = time.perf_counter()
    engine._grammar_mask(grammar)  # the first mask builds the vocabulary's view
    first_mask = time.perf_counter() - started
    print(f"{base_id}: schema compiled in {compiled * 1000:.1f} ms; vocabulary view and first mask {first_mask:.2f} s")
    free = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.tokens, grammar=grammar)
    asyncio.run(decode(engine, free, 1))  # warm up
    for streams in (int(s) for s in args.streams.split(",")):
        free_s, free_n = asyncio.run(decode(engine, free, streams))
        json_s, json_n = asyncio.run(decode(engine, constrained, streams))
        per_token = (json_s / json_n - free_s / free_n) * 1000
        print(f"{streams} stream(s): free {free_n / free_s:.1f} tok/s, json_schema {json_n / json_s:.1f} tok/s "
              f"(ratio {(json_n / json_s) / (free_n / free_s):.2f}); the mask costs {per_token:+.1f} ms a token "
              f"({json_n} and {free_n} tokens)")  # fmt: skip
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
