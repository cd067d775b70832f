"""Tool calls in chat completions: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

The prompt: a chat template that renders tools itself in the Hermes format (Qwen 2.5/3, Hermes, SmolLM3:
:attr:`solverx.models.chat_rules.ChatRules.native_tools`) gets the tools and the history as OpenAI's messages.
For any other template the same format goes into the messages: the signatures inside ``<tools></tools>`` in a
system message, each call answered as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, earlier calls
and their results in the history the same way (a result as ``<tool_response>`` in a user turn).

The answer: a grammar (:func:`solverx.engine.grammar.tool_call_grammar`) makes every call JSON that names one of
the tools and matches its parameter schema. ``required`` or a named function: the answer is calls only; ``auto``:
free text (not starting with ``<``) or calls; ``none``: free text, the tools only described.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from solverx.server.errors import InvalidRequest

__all__ = [
    "NO_TOOLS",
    "Tool",
    "ToolChoice",
    "native_message",
    "parse_calls",
    "parse_message_calls",
    "parse_tools",
    "render_history",
]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_START) + r"\s*(\{.*?\})\s*" + re.escape(CALL_END), re.S)
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def signature(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # none | auto | required (a named function is "required" with ``name``)
    name: str | None = None
    parallel: bool = True

    @property
    def calls(self) -> bool:
        return self.mode != "none"


NO_TOOLS = ToolChoice("none")


def parse_tools(fields: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request, checked; no tools: ``()``."""
    raw = fields.get("tools")
    if raw is None or raw == []:
        if fields.get("tool_choice") not in (None, "none", "auto"):
            raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice")
        return (), NO_TOOLS
    if not isinstance(raw, list):
        raise InvalidRequest("Invalid 'tools': expected an array of function tools.", param="tools")
    tools = tuple(_tool(item, f"tools[{i}]") for i, item in enumerate(raw))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("Invalid 'tools': two tools have the same name.", param="tools")
    parallel = fields.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("Invalid 'parallel_tool_calls': expected a boolean.", param="parallel_tool_calls")
    choice = fields.get("tool_choice", "auto")
    if isinstance(choice, str) and choice in CHOICES:
        return tools, ToolChoice(choice, parallel=parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        raise InvalidRequest(f"Invalid 'tool_choice': no tool is named {name!r}.", param="tool_choice")
    return tools, ToolChoice("required", name, parallel)


def _tool(item: Any, where: str) -> Tool:
    function = item.get("function") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(function, dict):
        raise InvalidRequest(f"Invalid '{where}': expected {{\"type\": \"function\", \"function\": {{...}}}}.",
                             param=where)  # fmt: skip
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(f"Invalid '{where}.function.name': 1-64 letters, digits, '_' or '-'.",
                             param=f"{where}.function.name")  # fmt: skip
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"Invalid '{where}.function.parameters': expected a JSON schema object.",
                             param=f"{where}.function.parameters")  # fmt: skip
    description = function.get("description") or ""
    return Tool(name, description if isinstance(description, str) else "", parameters)


def parse_message_calls(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """An assistant message's ``tool_calls``, as OpenAI sends them back in the history."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"Invalid '{where}': expected an array.", param=where)
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"Invalid '{where}[{i}]': expected a function call with a name.", param=where)
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise InvalidRequest(f"Invalid '{where}[{i}].function.arguments': not JSON.", param=where) from None
        calls.append({"id": str(call.get("id") or ""), "name": function["name"], "arguments": parsed})
    return tuple(calls)


def render_history(messages: list[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, str]]:
    """Template-ready messages: the tools' system block first, calls and results written the Hermes way."""
    out: list[dict[str, str]] = []
    if tools:
        out.append({"role": "system", "content": _tools_block(tools)})
    for message in messages:
        calls = message.get("tool_calls") or ()
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif calls:
            text = "\n".join(_call_text(c["name"], c["arguments"]) for c in calls)
            out.append(
                {"role": "assistant", "content": (message["content"] + "\n" if message["content"] else "") + text}
            )
        else:
            out.append({"role": message["role"], "content": message["content"]})
    # a system block of the request's own joins ours, so templates with one system turn get one
    if len(out) > 1 and out[0]["role"] == "system" and out[1]["role"] == "system" and tools:
        out[0:2] = [{"role": "system", "content": out[1]["content"] + "\n\n" + out[0]["content"]}]
    return out


def native_message(message: dict[str, Any]) -> dict[str, Any]:
    """A history message for a template that renders tools itself: calls as OpenAI's ``tool_calls`` (arguments as
    an object, which templates print with ``tojson``), results as ``tool`` turns."""
    calls = message.get("tool_calls") or ()
    if not calls:
        return message
    return message | {
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ]
    }


def _tools_block(tools: tuple[Tool, ...]) -> str:
    signatures = "\n".join(json.dumps(t.signature(), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        f'{CALL_START}{CALL_END} XML tags:\n{CALL_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}'
        f"\n{CALL_END}"
    )


def _call_text(name: str, arguments: Any) -> str:
    return f"{CALL_START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_END}"


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The answer's text outside calls (None when there is none) and its calls in OpenAI's shape."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
            calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                          "function": {"name": call["name"], "arguments": arguments}})  # fmt: skip
    rest = _CALL.sub("", text).strip() if calls else text
    return (rest or None) if calls else text, calls
