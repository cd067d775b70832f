"""A model is trained on exactly the prompts it is served: the engine and the SFT datasets encode one conversation
through the same chat rules (solverx.models.chat_rules), for a ChatML base and for a Gemma 2 that has no system role,
grounded turns included (the facts the server would retrieve, in the same place); and tools reach a template that
renders them itself as OpenAI's messages, any other as the documented Hermes block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solverx.adapters.facts import FACTS_FILE, Entity, Fact, FactGraph, write_graph
from solverx.engine.core import Engine
from solverx.models.lookalikes import build_gemma2
from solverx.server.grounding import GroundingPlan, ground
from solverx.server.schemas import parse_chat_request
from solverx.trainer.datasets import build_sft_dataset, grounded_pick
from solverx.trainer.recipe import Grounding, Recipe
from solverx.trainer.run import grounding_for
from solverx.trainer.validate import SftRecord

CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "Where is the head office?"},
    {"role": "assistant", "content": "It is in Seocho-dong, Seoul."},
    {"role": "system", "content": "Be polite."},  # a second system turn: folded too, where the family folds
    {"role": "user", "content": "And the core product?"},
    {"role": "assistant", "content": "SolverX Fusion."},
]


def served_and_trained(model_dir: Path) -> tuple[list[list[int]], list[list[int]], Engine]:
    """For each assistant turn: the prompt the engine serves for the chat before it, and the trainer's masked prefix."""
    engine = Engine(model_dir, model_dir.name).start()
    try:
        turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
        served = [engine.encode_chat(CONVERSATION[:i]) for i in turns]
        samples = build_sft_dataset([CONVERSATION], engine.tokenizer, 512).samples
        trained = [s.tokens[: s.offset] for s in samples]
        return served, trained, engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma2(tmp_path_factory.mktemp("gemma") / "gemma-2-tiny")


def test_chatml_base_is_trained_on_the_prompts_it_serves(tiny_model_dir: Path) -> None:
    served, trained, engine = served_and_trained(tiny_model_dir)
    assert not engine.chat_rules.fold_system
    assert len(trained) == 2 and served == trained
    text = engine.tokenizer.decode(served[1])
    assert "<|im_start|>system\nBe polite.<|im_end|>" in text  # ChatML keeps every system turn where it is


def test_gemma_base_folds_system_turns_alike_when_serving_and_training(gemma2: Path) -> None:
    served, trained, engine = served_and_trained(gemma2)
    assert engine.chat_rules.fold_system
    assert len(trained) == 2 and served == trained
    text = engine.tokenizer.decode(served[1])
    assert "Answer in one short sentence.\n\nBe polite.\n\nWhere is the head office?" in text
    assert "system" not in text


def fact_graph(path: Path) -> Path:
    """A two-fact graph about SolverX, as the trainer would write it beside a version."""
    graph = FactGraph(
        entities=[Entity("SolverX", ("솔버엑스",))],
        facts=[
            Fact("SolverX's headquarters is in Seocho-dong, Seoul.", "qa.jsonl:1", (0,), "Where is the head office?"),
            Fact("SolverX's core product is SolverX Fusion.", "qa.jsonl:2", (0,), "What is the core product?"),
        ],
    )
    return write_graph(graph, path / FACTS_FILE)


@pytest.mark.parametrize("family", ["chatml", "gemma2"])
def test_a_grounded_turn_is_trained_on_the_prompt_the_server_grounds(
    family: str, tiny_model_dir: Path, gemma2: Path, tmp_path: Path
) -> None:
    model_dir = tiny_model_dir if family == "chatml" else gemma2
    facts = fact_graph(tmp_path)
    recipe = Recipe(grounding=Grounding(enabled=True, train_fraction=1.0))
    chat = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Where is SolverX's head office?"},
        {"role": "assistant", "content": "It is in Seocho-dong, Seoul."},
        {"role": "user", "content": "And what is the weather like today?"},  # names no entity: nothing added
        {"role": "assistant", "content": "I cannot see outside."},
    ]
    plan = GroundingPlan(facts, enabled=True, top_k=3, min_score=0.6)
    engine = Engine(model_dir, model_dir.name).start()
    try:
        served_chats = [ground(plan, chat[:end], None) for end in (2, 4)]
        served = [engine.encode_chat(grounded.messages) for grounded in served_chats]
        dataset = build_sft_dataset(
            [SftRecord("chats.jsonl:1", chat)], engine.tokenizer, 512, context_for=grounding_for(facts, recipe),
            grounded_fraction=1.0,
        )  # fmt: skip
    finally:
        engine.stop()
    grounded = [s.tokens[: s.offset] for s in dataset.samples if s.kind == "grounded"]
    plain = [s.tokens[: s.offset] for s in dataset.samples if s.kind == "sft"]
    assert [len(g.facts) for g in served_chats] == [2, 0]
    assert grounded == served[:1]  # token for token, in the family's own format
    assert grounded[0] != plain[0] and plain[1] == served[1]  # the off-entity turn is served, and trained, as written
    text = engine.tokenizer.decode(grounded[0])
    assert "Seocho-dong" in text and "Answer in one short sentence." in text
    assert ("system" in text) is (family == "chatml")  # Gemma gets the facts folded into the first user turn


def test_a_grounded_fraction_picks_the_same_chats_whatever_their_order() -> None:
    chats = [[{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}] for i in range(400)]
    picked = {i for i, chat in enumerate(chats) if grounded_pick(chat, 0.3, seed=0)}
    assert picked == {i for i, chat in reversed(list(enumerate(chats))) if grounded_pick(chat, 0.3, seed=0)}
    assert 0.22 < len(picked) / len(chats) < 0.38
    assert picked != {i for i, chat in enumerate(chats) if grounded_pick(chat, 0.3, seed=1)}
    assert not any(grounded_pick(chat, 0.0, seed=0) for chat in chats)
    assert all(grounded_pick(chat, 1.0, seed=0) for chat in chats)


# -- tools: a template that renders them itself gets them, any other gets our Hermes block --------------------

# Qwen2.5-Instruct's chat template (Apache-2.0), as its tokenizer_config.json publishes it: it takes ``tools`` and
# writes calls as <tool_call>, the format our grammar and parser use.
QWEN_TEMPLATE = Path(__file__).parent / "data" / "qwen2.5_chat_template.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Seoul?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "tools": [WEATHER],
}  # fmt: skip


@pytest.fixture(scope="module")
def qwen_like(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with Qwen2.5's chat template."""
    out = tmp_path_factory.mktemp("qwen-like") / "qwen-like"
    out.mkdir()
    for item in tiny_model_dir.iterdir():
        (out / item.name).symlink_to(item)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.unlink()
    config_path.write_text(json.dumps(config | {"chat_template": QWEN_TEMPLATE.read_text()}))
    return out


def prompt_text(model_dir: Path, body: dict) -> tuple[str, Engine]:
    """The prompt the server builds for ``body`` on ``model_dir``'s base, as text."""
    engine = Engine(model_dir, model_dir.name).start()
    try:
        request = parse_chat_request({"model": model_dir.name, **body}, model_dir.name)
        return engine.tokenizer.decode(request.encode(engine)), engine
    finally:
        engine.stop()


def test_a_template_that_renders_tools_gets_them_and_the_history_as_openai_messages(qwen_like: Path) -> None:
    text, engine = prompt_text(qwen_like, TOOL_CHAT)
    assert engine.chat_rules.native_tools
    openai_shaped = [dict(m) for m in TOOL_CHAT["messages"]]
    openai_shaped[1] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}},
    ]}  # fmt: skip
    assert text == engine.tokenizer.apply_chat_template(
        openai_shaped, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )  # exactly what the model's own template makes of OpenAI's messages
    system = text.split("<|im_end|>")[0]
    assert "You are Qwen" in system and json.dumps(WEATHER) in system  # the template's own words and the tool
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, clear\n</tool_response><|im_end|>" in text


def test_a_template_without_tools_gets_the_documented_hermes_block(tiny_model_dir: Path) -> None:
    text, engine = prompt_text(tiny_model_dir, TOOL_CHAT)
    assert not engine.chat_rules.native_tools
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, clear\n</tool_response>" in text
