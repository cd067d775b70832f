"""Structured outputs: the tokens a sequence may sample next, from a JSON schema, with llguidance.

llguidance (the grammar engine behind llama.cpp's ``--json-schema`` and vLLM's guidance backend) compiles a JSON
schema into a grammar and, at each step, into a bitmask over the vocabulary in tens of microseconds on the CPU; it
needs no per-schema index over the vocabulary built ahead (outlines-core does) and no torch (xgrammar's CPU path).
A constrained sequence carries a :class:`GrammarMask` among its logits processors, so a batch mixes constrained
and free sequences, each on its own schema and adapter, in one forward pass: the mask touches only its own row.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}  # response_format {"type": "json_object"}


class InvalidGrammar(ValueError):
    """The schema cannot be compiled; the message says why (a 400 naming ``param``)."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


def json_schema_grammar(schema: dict[str, Any], *, strict: bool = True) -> str:
    """The llguidance grammar of JSON documents that ``schema`` accepts; raise :class:`InvalidGrammar` when it
    cannot be compiled. ``strict`` forbids properties the schema does not name (OpenAI's ``strict: true``)."""
    from llguidance import LLMatcher

    # Compact JSON (no free whitespace: a small model left free to indent may indent forever); keywords the compiler
    # does not implement are an error in strict mode and ignored otherwise.
    options = {"whitespace_flexible": False, "lenient": not strict}
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
    except (ValueError, TypeError) as exc:
        raise InvalidGrammar(f"the JSON schema cannot be compiled: {exc}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidGrammar(f"the JSON schema cannot be compiled: {error}")
    return grammar


class GrammarTokenizer:
    """llguidance's view of a model's vocabulary: built once per engine (about a second), shared by its matchers."""

    def __init__(self, hf_tokenizer: Any, eos_tokens: set[int], vocab_size: int) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=sorted(eos_tokens))

    def mask(self, grammar: str) -> GrammarMask:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidGrammar(f"the grammar cannot be used with this model: {matcher.get_error()}")
        return GrammarMask(matcher, self.vocab_size)


class GrammarMask:
    """A logits processor (mlx-lm's ``(tokens, logits) -> logits``) that lets through only the tokens the grammar
    allows next, after feeding the matcher the tokens sampled since its last call."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self.vocab_size, self.consumed = matcher, vocab_size, 0
        self.bitmask = allocate_token_bitmask(1, vocab_size)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        from llguidance.numpy import fill_next_token_bitmask

        new = tokens.tolist()[self.consumed :]
        if new:
            self.matcher.consume_tokens(new)  # a token outside the mask puts it in its error state (never here)
            self.consumed += len(new)
        if self.matcher.is_error():
            return logits  # nothing sensible to allow: leave the row free rather than mask every token
        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        allowed = np.zeros(logits.shape[-1], dtype=bool)
        width = min(len(bits), logits.shape[-1], self.vocab_size)
        allowed[:width] = bits[:width]
        return mx.where(mx.array(allowed), logits, -mx.inf)


def _closed(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool's parameter schema with no arguments beyond those it names, unless it says otherwise: a small model
    left free to add keys adds them until it runs out of tokens (measured on SmolLM2 with LangChain's schemas)."""
    schema = dict(parameters or {"type": "object"})
    if schema.get("type") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
    return schema


def tool_call_grammar(tools: list[tuple[str, dict[str, Any]]], *, text_allowed: bool, parallel: bool) -> str:
    """Answers made of Hermes-style calls, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, each
    naming one of ``tools`` (name, parameter schema) with arguments its schema accepts; one call unless
    ``parallel``. With ``text_allowed`` the answer may instead be free text that does not start with ``<``."""
    from llguidance import LLMatcher

    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": _closed(parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in tools
    ]
    body = dict(calls[0]) if len(calls) == 1 else {"anyOf": calls}
    body["x-guidance"] = {"whitespace_flexible": False, "lenient": True}  # compact JSON, as json_schema_grammar
    lines = [
        "start: " + ("TEXT | calls" if text_allowed else "calls"),
        'calls: call ("\\n" call)*' if parallel else "calls: call",
        'call: "<tool_call>\\n" body "\\n</tool_call>"',
        "body: %json " + json.dumps(body),
    ]
    if text_allowed:
        lines.append(r"TEXT: /[^<](.|\n)*/")
    grammar = LLMatcher.grammar_from_lark("\n".join(lines) + "\n")
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidGrammar(f"the tools' parameter schemas cannot be compiled: {error}", param="tools")
    return grammar
