"""Adapters served end to end (issue 4): registry, per-request selection by model name, isolation, hot-swap.

One real ``solverx serve`` subprocess for the module, the official ``openai`` SDK as the chat client, plain httpx
for the admin API, the CLI as a subprocess and the registry itself (as another process would use it) on the
same state directory. The adapters are really trained on the tiny base (``tests/adapter_fixtures.py``), each on
its own theme, so a temperature-0 answer tells which adapter, and which version of it, produced it.

Adapter names are unique per test (the daemon is shared), so the tests do not depend on each other's order.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import adapter_fixtures as fixtures
import httpx
import openai
import pytest
from serving import REPO_ROOT, TINY_BASE_ID, Daemon, serve_daemon

BASE = TINY_BASE_ID
MAX_TOKENS = 20
RESIDENT = 2  # adapters the module's daemon keeps loaded: every test also exercises eviction and reloading
PROMPTS = ("What is Python?", "How do rivers form?", "Who are you?")


# -- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory) -> fixtures.TrainedAdapters:
    return fixtures.trained_adapters(tiny_model_dir, tmp_path_factory.mktemp("trained-adapters"))


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory, trained) -> Daemon:
    home = tmp_path_factory.mktemp("adapters-home")
    with serve_daemon(home, tiny_model_dir, ("--max-resident-adapters", str(RESIDENT))) as server:
        yield server


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url, api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ab(daemon, trained) -> None:
    """Adapters ``a`` and ``b`` (one promoted version each)."""
    register(daemon, "a", trained.a)
    register(daemon, "b", trained.b)


def admin(daemon: Daemon, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, daemon.api_url + path, timeout=60, **kwargs)


def register(daemon: Daemon, name: str, path: Path, promote: bool = True) -> dict:
    response = admin(daemon, "POST", "/adapters", json={"name": name, "path": str(path), "promote": promote})
    assert response.status_code == 201, response.text
    return response.json()


def chat(client: openai.OpenAI, model: str, prompt: str = PROMPTS[0], max_tokens: int = MAX_TOKENS) -> str:
    """The temperature-0 answer of ``model`` to one user message."""
    result = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    assert result.model == model
    return result.choices[0].message.content


def answers(client: openai.OpenAI, model: str, max_tokens: int = MAX_TOKENS) -> tuple[str, ...]:
    return tuple(chat(client, model, prompt, max_tokens) for prompt in PROMPTS)


def health(daemon: Daemon) -> dict:
    return httpx.get(daemon.base_url + "/health", timeout=10).json()


def assert_error(response: httpx.Response, status: int, code: str, openapi=None) -> dict:
    """An error in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if openapi is not None:
        openapi("ErrorResponse", body)
    return body["error"]


def model_ids(client: openai.OpenAI) -> set[str]:
    return {model.id for model in client.models.list()}


def base_still_serves(client: openai.OpenAI, expected: str) -> None:
    assert chat(client, BASE) == expected


# -- 1. /v1/models -----------------------------------------------------------------------------------------


def test_models_lists_adapters_and_pinned_versions(daemon, client, trained, openapi):
    assert "m" not in model_ids(client)
    register(daemon, "m", trained.a)
    register(daemon, "m", trained.b, promote=False)

    raw = client.models.with_raw_response.list()
    body = json.loads(raw.text)
    openapi("ListModelsResponse", body)
    cards = {card["id"]: card for card in body["data"]}
    assert len(cards) == len(body["data"]), "an id is listed twice"
    base = cards[BASE]
    assert (base["object"], base["owned_by"], base["parent"], base["root"]) == ("model", "solverx", None, BASE)
    for model_id, root in (("m", "m@1"), ("m@1", "m@1"), ("m@2", "m@2")):
        card = cards[model_id]
        assert card["object"] == "model" and card["owned_by"] == "solverx"
        assert (card["parent"], card["root"]) == (BASE, root)
        assert isinstance(card["created"], int) and card["created"] > 0
    assert client.models.retrieve("m@2").id == "m@2"
    assert client.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("m@3")

    assert admin(daemon, "DELETE", "/adapters/m").status_code == 200
    assert not {"m", "m@1", "m@2"} & model_ids(client)


# -- 2. selection by name and by pin -----------------------------------------------------------------------


def test_selection_by_name_and_pin(client, ab):
    base, a, b = answers(client, BASE), answers(client, "a"), answers(client, "b")
    assert answers(client, "a@1") == a
    assert answers(client, "b@1") == b
    for i in range(len(PROMPTS)):
        assert len({base[i], a[i], b[i]}) == 3, (base[i], a[i], b[i])
    # each answer is the theme the adapter was trained on, not noise
    assert all(fixtures.speaks(text, "apples") for text in a) and all(fixtures.speaks(text, "rivers") for text in b)
    # a second time: same answers (nothing cached wrongly, nothing drifted)
    assert answers(client, BASE) == base
    assert answers(client, "a") == a


def test_selection_works_for_text_completions_and_streams(client, ab):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    streamed = client.chat.completions.create(
        model="a@1", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == chat(client, "a")
    completions = {
        model: client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
        for model in (BASE, "a", "b")
    }
    assert len({c.choices[0].text for c in completions.values()}) == 3
    assert all(c.model == model for model, c in completions.items())


@pytest.mark.parametrize("model", ["nope", "a@99", "../x", "a/b", "A@x", "A", "a@x", "a@0", "a@-1", "a@1@1", "a@"])
def test_unknown_or_invalid_model_is_404(daemon, client, ab, openapi, model):
    """Unknown adapters, missing versions, paths and malformed names: all 404 ``model_not_found``, never a file
    looked up outside the registry."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(openai.NotFoundError) as caught:  # the SDK's own exception and fields
        client.chat.completions.create(**body)
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    for stream in (False, True):
        response = admin(daemon, "POST", "/chat/completions", json=body | {"stream": stream})
        error = assert_error(response, 404, "model_not_found", openapi)
        assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert_error(admin(daemon, "POST", "/completions", json={"model": model, "prompt": "hi"}), 404, "model_not_found")


def test_empty_model_is_400(daemon, openapi):
    body = {"model": "", "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(admin(daemon, "POST", "/chat/completions", json=body), 400, "invalid_value", openapi)
    assert error["param"] == "model"


# -- 3. isolation ------------------------------------------------------------------------------------------


def test_concurrent_mixed_requests_are_isolated(daemon, client, ab):
    models = (BASE, "a", "b")
    alone = {(model, prompt): chat(client, model, prompt) for model in models for prompt in PROMPTS}

    async def together() -> list[tuple[str, str, str]]:
        async_client = openai.AsyncOpenAI(base_url=daemon.api_url, api_key="not-needed", max_retries=0, timeout=60)

        async def one(model: str, prompt: str, stream: bool) -> tuple[str, str, str]:
            request = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS)
            if not stream:
                result = await async_client.chat.completions.create(**request, temperature=0)
                return model, prompt, result.choices[0].message.content
            parts = []
            async for chunk in await async_client.chat.completions.create(**request, temperature=0, stream=True):
                parts.extend(choice.delta.content or "" for choice in chunk.choices)
            return model, prompt, "".join(parts)

        async with async_client:
            # interleaved: a, b, base alternate in the batch; every third request streams
            jobs = [(m, p) for p in PROMPTS for m in models]
            return await asyncio.gather(*(one(m, p, i % 3 == 0) for i, (m, p) in enumerate(jobs)))

    results = asyncio.run(together())
    assert len(results) == 9
    for model, prompt, text in results:
        assert text == alone[(model, prompt)], (model, prompt)
    assert health(daemon)["running"] == 0


def test_adapters_compute_what_mlx_lm_computes(client, trained, tiny_model_dir, ab):
    """Not just different: each answer is, token for token, what mlx-lm's own LoRA layers give at temperature 0
    (``mlx_lm.load(..., adapter_path=)``), so the server applies each adapter's A, B and scale correctly."""
    for model, adapter in ((BASE, None), ("a", trained.a), ("b", trained.b)):
        assert list(answers(client, model)) == fixtures.mlx_lm_greedy(tiny_model_dir, adapter, PROMPTS, MAX_TOKENS)


def test_each_adapter_keeps_its_own_rank_and_scale(daemon, client, trained, tiny_model_dir, ab, tmp_path):
    before = {model: answers(client, model) for model in (BASE, "a", "b")}
    faint, reference = fixtures.faint(tiny_model_dir, trained.a, tmp_path, PROMPTS, MAX_TOKENS)
    register(daemon, "faint", faint)  # A weakened until its answers are neither A's nor the base's
    assert list(answers(client, "faint")) == reference
    # the same function at rank 16 (above the engine's rank 8: every slot grows), and at 4x the scale with B / 4
    register(daemon, "wide", fixtures.padded_rank(faint, tmp_path / "wide", rank=16))
    register(daemon, "loud", fixtures.rescaled(faint, tmp_path / "loud", b_factor=0.25, scale_factor=4.0))
    assert list(answers(client, "wide")) == reference
    assert list(answers(client, "loud")) == reference
    assert {model: answers(client, model) for model in before} == before  # nobody else changed


def test_more_adapters_than_resident_slots(daemon, client, trained, ab):
    """Four versions wanted at once, two resident slots: requests wait for a slot, adapters are evicted and
    reloaded, and every answer is still exactly its own adapter's."""
    sources = {"lru-a": trained.a, "lru-b": trained.b, "lru-s": trained.a2, "lru-t": trained.c}
    for name, path in sources.items():
        register(daemon, name, path)
    alone = {name: chat(client, name) for name in sources}
    assert (alone["lru-a"], alone["lru-b"]) == (chat(client, "a"), chat(client, "b"))
    assert len(set(alone.values())) == 4

    async def together() -> list[tuple[str, str]]:
        async_client = openai.AsyncOpenAI(base_url=daemon.api_url, api_key="not-needed", max_retries=0, timeout=60)

        async def one(model: str) -> tuple[str, str]:
            messages = [{"role": "user", "content": PROMPTS[0]}]
            result = await async_client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            return model, result.choices[0].message.content

        async with async_client:
            return await asyncio.gather(*(one(name) for _ in range(2) for name in sources))

    results = asyncio.run(together())
    assert sorted(results) == sorted((name, alone[name]) for _ in range(2) for name in sources)
    assert health(daemon)["running"] == 0


def test_a_request_waiting_for_a_slot_blocks_nobody_else(daemon, client, trained, ab):
    """Both resident slots held by long streams: a request for a third adapter waits for a slot, but requests on
    the base or on a resident adapter behind it start at once (no head-of-line blocking across adapters)."""
    for name, path in (("hol-x", trained.a), ("hol-y", trained.b), ("hol-z", trained.c)):
        register(daemon, name, path)
    expected = {model: chat(client, model, max_tokens=8) for model in ("hol-z", BASE, "hol-x")}
    long_done: list[float] = []
    started = [threading.Event(), threading.Event()]
    failures: list[BaseException] = []

    def hold(i: int, model: str) -> None:
        try:
            messages = [{"role": "user", "content": PROMPTS[0]}]
            long = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}  # an answer's end must not free it early
            chunks = client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True, **long)
            for _ in chunks:
                started[i].set()
            long_done.append(time.monotonic())
        except BaseException as exc:
            failures.append(exc)
        finally:
            started[i].set()

    waiting: list[str] = []
    holders = [threading.Thread(target=hold, args=(i, m)) for i, m in enumerate(("hol-x", "hol-y"))]
    for thread in holders:
        thread.start()
    assert all(event.wait(60) for event in started)
    blocked = threading.Thread(target=lambda: waiting.append(chat(client, "hol-z", max_tokens=8)))
    blocked.start()
    deadline = time.monotonic() + 10
    while health(daemon)["waiting"] < 1:
        assert time.monotonic() < deadline and not long_done, "the third adapter never waited for a slot"
        time.sleep(0.01)

    assert chat(client, BASE, max_tokens=8) == expected[BASE]
    assert chat(client, "hol-x", max_tokens=8) == expected["hol-x"]
    overtaken = time.monotonic()
    for thread in [*holders, blocked]:
        thread.join(120)
    assert not failures, failures
    assert waiting == [expected["hol-z"]]
    assert len(long_done) == 2 and min(long_done) > overtaken, "the base and a resident adapter waited behind it"


# -- 4. promote and roll back over HTTP --------------------------------------------------------------------


def test_promote_rollback_and_remove_over_http(daemon, client, trained, openapi):
    first = register(daemon, "p", trained.a)
    assert (first["id"], first["version"], first["status"]) == ("p@1", 1, "promoted")
    v1 = chat(client, "p")
    second = register(daemon, "p", trained.a2)
    assert (second["id"], second["status"]) == ("p@2", "promoted")
    v2 = chat(client, "p")
    assert v2 == chat(client, "p@2") != v1 == chat(client, "p@1")

    shown = admin(daemon, "GET", "/adapters/p").json()
    assert shown["promoted"] == 2
    assert [(v["version"], v["status"]) for v in shown["versions"]] == [(1, "retired"), (2, "promoted")]
    for version in shown["versions"]:
        assert version["base_id"] == BASE and version["stage"] == "imported" and version["parent"] is None
        assert version["base_fingerprint"].startswith("sha256:") and len(version["weights_sha256"]) == 64
        assert version["rank"] == fixtures.RANK

    rolled = admin(daemon, "POST", "/adapters/p/rollback")
    assert rolled.status_code == 200 and rolled.json()["id"] == "p@1"
    assert chat(client, "p") == v1
    assert chat(client, "p@2") == v2  # a pin keeps working whatever is promoted

    promoted = admin(daemon, "POST", "/adapters/p/promote", json={"version": 2})
    assert promoted.status_code == 200 and promoted.json()["status"] == "promoted"
    assert chat(client, "p") == v2
    assert admin(daemon, "POST", "/adapters/p/rollback", json={"version": 1}).json()["id"] == "p@1"
    assert chat(client, "p") == v1

    shown = admin(daemon, "GET", "/adapters/p").json()
    assert shown["promoted"] == 1
    assert [(v["version"], v["status"]) for v in shown["versions"]] == [(1, "promoted"), (2, "retired")]
    assert admin(daemon, "GET", "/adapters/p@2").json()["id"] == "p@2"
    listed = {entry["name"]: entry for entry in admin(daemon, "GET", "/adapters").json()["data"]}
    assert [v["id"] for v in listed["p"]["versions"]] == ["p@1", "p@2"]

    # the promoted version cannot be removed; another one can, and its pin is gone for good
    assert_error(admin(daemon, "DELETE", "/adapters/p@1"), 409, "adapter_conflict", openapi)
    assert admin(daemon, "DELETE", "/adapters/p@2").status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "p@2")
    assert_error(admin(daemon, "POST", "/adapters/p/promote", json={"version": 2}), 404, "model_not_found")
    assert_error(admin(daemon, "GET", "/adapters/p@2"), 404, "model_not_found")
    assert [v["version"] for v in admin(daemon, "GET", "/adapters/p").json()["versions"]] == [1]
    assert chat(client, "p") == v1
    assert "p@2" not in model_ids(client)

    # a version number is never reused: the next registration is 3
    assert register(daemon, "p", trained.b, promote=False)["version"] == 3
    assert chat(client, "p") == v1  # a candidate is not served by name
    assert_error(admin(daemon, "GET", "/adapters/nope"), 404, "model_not_found")
    assert_error(admin(daemon, "POST", "/adapters/nope/rollback"), 404, "model_not_found")


# -- 5. vLLM's load/unload -----------------------------------------------------------------------------------


def test_vllm_load_and_unload_lora_adapter(daemon, client, trained, ab):
    loaded = admin(daemon, "POST", "/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(trained.b)})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["id"] == "vl@1"
    assert {"vl", "vl@1"} <= model_ids(client)
    assert chat(client, "vl") == chat(client, "b")  # the same weights give the same answer in another slot

    unloaded = admin(daemon, "POST", "/unload_lora_adapter", json={"lora_name": "vl"})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError):
        chat(client, "vl")
    assert not {"vl", "vl@1"} & model_ids(client)
    assert_error(admin(daemon, "POST", "/unload_lora_adapter", json={"lora_name": "vl"}), 404, "model_not_found")
    missing = {"lora_name": "vl", "lora_path": str(trained.b.parent / "absent")}
    assert_error(admin(daemon, "POST", "/load_lora_adapter", json=missing), 400, "invalid_value")
    assert_error(admin(daemon, "POST", "/load_lora_adapter", json={"lora_name": "vl"}), 400, "invalid_value")


# -- 6. hot-swap under load --------------------------------------------------------------------------------

SWAP_TOKENS = 160  # long enough to outlast the promote even when the prompt cache makes their prefill instant
SWAP_PROMPTS = tuple(f"Question {i}: {q}" for i, q in enumerate((*fixtures.QUESTIONS, "What is a dog?", "Hello!")))


def test_hot_swap_under_load(daemon, client, trained):
    register(daemon, "hs", trained.a)
    v1 = {prompt: chat(client, "hs@1", prompt, SWAP_TOKENS) for prompt in SWAP_PROMPTS}  # each alone
    uptime = health(daemon)["uptime_s"]

    first_delta = [threading.Event() for _ in SWAP_PROMPTS]
    streamed: dict[str, list[tuple[float, str]]] = {prompt: [] for prompt in SWAP_PROMPTS}
    failures: list[BaseException] = []

    def stream(i: int, prompt: str) -> None:
        try:
            messages = [{"role": "user", "content": prompt}]
            chunks = client.chat.completions.create(
                model="hs", messages=messages, max_tokens=SWAP_TOKENS, temperature=0, stream=True
            )
            for chunk in chunks:
                for choice in chunk.choices:
                    if choice.delta.content:
                        streamed[prompt].append((time.monotonic(), choice.delta.content))
                        first_delta[i].set()
        except BaseException as exc:  # every failure is reported below
            failures.append(exc)
        finally:
            first_delta[i].set()

    threads = [threading.Thread(target=stream, args=(i, p)) for i, p in enumerate(SWAP_PROMPTS)]
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in first_delta)  # every stream is running on v1

    swapped = register(daemon, "hs", trained.a2)  # register and promote v2 while they stream
    promoted_at = time.monotonic()
    assert swapped["id"] == "hs@2"
    # v1 is no longer promoted: it can even be deleted while its streams run (they hold its loaded weights)
    assert admin(daemon, "DELETE", "/adapters/hs@1").status_code == 200
    after: list[str] = []  # requests that start after the promote returned: v2, at once
    while not after or (time.monotonic() < promoted_at + 1.0 and any(t.is_alive() for t in threads)):
        after.append(chat(client, "hs", SWAP_PROMPTS[0], SWAP_TOKENS))
    for thread in threads:
        thread.join(60)

    assert not failures, failures
    in_flight = 0
    for prompt, chunks in streamed.items():
        assert "".join(text for _, text in chunks) == v1[prompt], prompt  # started on v1, finished on v1
        in_flight += chunks[-1][0] > promoted_at
    assert in_flight > 0, "every stream finished before the promote returned: nothing was swapped under load"
    v2 = chat(client, "hs@2", SWAP_PROMPTS[0], SWAP_TOKENS)
    assert v2 != v1[SWAP_PROMPTS[0]]
    assert after == [v2] * len(after)
    with pytest.raises(openai.NotFoundError):
        chat(client, "hs@1")

    # the base was not reloaded: same process, one model load, the uptime kept counting
    assert daemon.process.poll() is None
    assert health(daemon)["uptime_s"] >= uptime
    assert daemon.log().count(f"serving {BASE} from") == 1
    assert daemon.log().count("Application startup complete") == 1


# -- 7. another process changes the registry ---------------------------------------------------------------


def test_registry_change_by_another_process_is_served(daemon, client, trained, tiny_model_dir):
    from solverx.adapters.registry import Registry

    register(daemon, "ext", trained.b)
    before = chat(client, "ext")
    registry = Registry(daemon.home / "adapters")  # not through HTTP: as the trainer's child process does
    info = registry.register(trained.c, "ext", base_id=BASE, base_dir=tiny_model_dir, promote=True)
    assert info.version == 2
    after = chat(client, "ext")
    assert after == chat(client, "ext@2") != before
    assert fixtures.speaks(after, "trains") and not fixtures.speaks(before, "trains")
    assert "ext@2" in model_ids(client)

    registry.rollback("ext")
    assert chat(client, "ext") == before
    registry.remove("ext")
    with pytest.raises(openai.NotFoundError):
        chat(client, "ext")


# -- 8. bad adapters ---------------------------------------------------------------------------------------

BAD = {  # what is wrong → (status, code)
    "truncated": (400, "invalid_adapter"),
    "wrong_shapes": (400, "invalid_adapter"),
    "unknown_layer": (400, "invalid_adapter"),
    "unknown_key": (400, "invalid_adapter"),
    "declared_other_base": (409, "base_mismatch"),
    "for_other_base": (400, "invalid_adapter"),
    "missing_weights": (400, "invalid_adapter"),
    "missing_config": (400, "invalid_adapter"),
}


@pytest.fixture(scope="module")
def bad(trained, tmp_path_factory) -> dict[str, Path]:
    return fixtures.bad_adapters(trained.a, tmp_path_factory.mktemp("bad-adapters"))


@pytest.fixture(scope="module")
def base_answer(client) -> str:
    return chat(client, BASE)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_adapter_is_refused_and_serving_continues(daemon, client, bad, base_answer, openapi, kind):
    status, code = BAD[kind]
    name = "bad-" + kind.replace("_", "-")
    for path, body, param in (
        ("/adapters", {"name": name, "path": str(bad[kind])}, "path"),
        ("/load_lora_adapter", {"lora_name": name, "lora_path": str(bad[kind])}, "lora_path"),
    ):
        error = assert_error(admin(daemon, "POST", path, json=body), status, code, openapi)
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        base_still_serves(client, base_answer)
    assert_error(admin(daemon, "GET", f"/adapters/{name}"), 404, "model_not_found")  # nothing was registered
    assert name not in model_ids(client)
    assert not (daemon.home / "adapters" / name).exists()
    tmp = daemon.home / "adapters" / ".tmp"  # the refused copy was cleaned up
    assert not tmp.exists() or not any(tmp.iterdir())


@pytest.mark.parametrize("name", ["../evil", "a/b", "UPPER", "", ".hidden", "x" * 65, "a@1", "a b", BASE])
def test_invalid_names_are_refused(daemon, client, trained, base_answer, openapi, tmp_path, name):
    """Never a path, never a base's id (a base wins name resolution: such an adapter could not be selected)."""
    for path, body, param in (
        ("/adapters", {"name": name, "path": str(trained.a)}, "name"),
        ("/load_lora_adapter", {"lora_name": name, "lora_path": str(trained.a)}, "lora_name"),
        ("/adapters", {"name": name, "path": str(tmp_path / "absent")}, "name"),  # the name is checked first
    ):
        assert assert_error(admin(daemon, "POST", path, json=body), 400, "invalid_name", openapi)["param"] == param
    base_still_serves(client, base_answer)
    assert not (daemon.home / "evil").exists() and not (daemon.home / "adapters" / "a" / "b").exists()
    if name and "/" not in name:
        assert not (daemon.home / "adapters" / name).exists()
    assert name not in {entry["name"] for entry in admin(daemon, "GET", "/adapters").json()["data"]}


def test_bad_requests_to_register(daemon, client, base_answer, openapi, tmp_path):
    nowhere = str(tmp_path / "does-not-exist")
    error = assert_error(admin(daemon, "POST", "/adapters", json={"name": "x", "path": nowhere}), 400, "invalid_value")
    assert error["param"] == "path"
    assert_error(admin(daemon, "POST", "/adapters", json={"name": "x"}), 400, "invalid_value", openapi)
    assert_error(admin(daemon, "POST", "/adapters", json={"path": nowhere}), 400, "invalid_value")
    assert_error(admin(daemon, "POST", "/adapters", json=["x"]), 400, "invalid_value")
    assert_error(admin(daemon, "POST", "/adapters", content=b"{not json"), 400, "invalid_json")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(admin(daemon, "POST", "/adapters", json={"name": "x", "path": str(empty)}), 400, "invalid_adapter")
    base_still_serves(client, base_answer)


def test_version_corrupted_on_disk_is_refused_per_request(daemon, client, trained, ab, base_answer, openapi):
    """Versions are immutable, but a disk can still lose one: its requests fail cleanly, nothing else does."""
    info = register(daemon, "rot", trained.b)
    weights = Path(info["path"]) / "adapters.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:100])
    body = {"model": "rot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for stream in (False, True):
        response = admin(daemon, "POST", "/chat/completions", json=body | {"stream": stream})
        assert_error(response, 400, "invalid_adapter", openapi)
    base_still_serves(client, base_answer)
    assert chat(client, "a@1") == chat(client, "a")
    assert health(daemon)["status"] == "ok"


# -- 9. the CLI --------------------------------------------------------------------------------------------


def solverx_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    """``solverx adapters ...`` as a user runs it, on the daemon's state directory."""
    installed = Path(sys.executable).with_name("solverx")
    command = [str(installed)] if installed.exists() else [sys.executable, "-m", "solverx"]
    command += ["adapters", *args, "--home", str(daemon.home), "--config", str(daemon.home / "config.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return result


def test_cli_changes_what_the_daemon_serves(daemon, client, trained):
    register(daemon, "cli", trained.a)
    v1 = chat(client, "cli")
    registered = json.loads(solverx_cli(daemon, "register", "cli", str(trained.c), "--no-promote", "--json").stdout)
    assert (registered["version"], registered["status"]) == (2, "candidate")
    assert chat(client, "cli") == v1
    v2 = chat(client, "cli@2")
    assert v2 != v1

    listed = json.loads(solverx_cli(daemon, "list", "--json").stdout)
    assert [(v["version"], v["status"]) for v in listed["cli"]] == [(1, "promoted"), (2, "candidate")]

    solverx_cli(daemon, "promote", "cli@2")
    assert chat(client, "cli") == v2
    assert admin(daemon, "GET", "/adapters/cli").json()["promoted"] == 2
    solverx_cli(daemon, "rollback", "cli")
    assert chat(client, "cli") == v1
    solverx_cli(daemon, "promote", "cli", "--version", "2")
    assert chat(client, "cli") == v2
    solverx_cli(daemon, "rollback", "cli", "--version", "1")
    assert chat(client, "cli") == v1
    solverx_cli(daemon, "remove", "cli@2")
    with pytest.raises(openai.NotFoundError):
        chat(client, "cli@2")
    assert [v["version"] for v in json.loads(solverx_cli(daemon, "show", "cli", "--json").stdout)] == [1]
