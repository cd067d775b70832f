"""One set of chat rules per model family, used by serving and training alike.

A model must be trained on exactly the prompts it is served: the engine (``solverx.engine.core``) and the SFT
datasets (``solverx.trainer.datasets``) both turn messages into token ids here, with the same system-message
handling and the same rendering (template to text, then ``encode`` without extra special tokens: the template
already has them).

Gemma's templates have no system role: every system message is folded into the first user turn. Other families
keep theirs. A family we do not know is probed: a template that raises on a system turn gets folding too.

Tools: a template that renders them itself in the Hermes format (it takes ``tools`` and writes ``<tool_call>``:
Qwen 2.5/3, Hermes, SmolLM3) gets them and the history's calls and results as OpenAI's messages, so the prompt
is the one the model was trained on; for every other template :mod:`solverx.server.tools` writes the same format
into the messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# mlx-lm model types whose chat templates reject a ``system`` turn
NO_SYSTEM_ROLE = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})

Message = dict[str, Any]


def text_of(content: Any) -> str:
    """A message's text: the string itself, or its text parts (OpenAI's content-part form) one per line."""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or () if part.get("type", "text") == "text")


def last_user_text(messages: Sequence[Message]) -> str:
    """The text of the last user message ("" when there is none): the question that grounding retrieves facts for,
    in serving and in training alike."""
    return next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


def with_context(messages: Sequence[Message], context: str | None) -> list[Message]:
    """``messages`` with ``context`` (grounding facts) as a system turn before everything else, merged into the
    chat's own leading system message if it has one; ``None`` leaves them as they are.

    Serving, evaluation and training all ground through here, so a model is trained on the grounded prompts it is
    served (the family's rules then fold the system turn where the template has none).
    """
    if context is None:
        return list(messages)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{context}\n\n{text_of(messages[0].get('content'))}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


def fold_system_message(messages: Sequence[Message]) -> list[Message]:
    """Move system text into the first user turn, for templates without a system role.

    Every system message is removed; their text (joined by blank lines) is prepended to the first user
    message, or becomes a user message of its own when there is none. The input list is not modified.
    """
    system = [text_of(m.get("content")) for m in messages if m.get("role") == "system"]
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    prefix = "\n\n".join(s for s in system if s)
    for message in rest:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                message["content"] = [{"type": "text", "text": prefix + "\n\n"}, *content]
            else:
                message["content"] = f"{prefix}\n\n{content or ''}"
            return rest
    return [{"role": "user", "content": prefix}, *rest]


def _template_accepts_system(tokenizer: Any) -> bool:
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        return True
    except Exception:  # jinja's raise_exception, or any template error: treat the role as unsupported
        return False


def _template_renders_hermes_tools(tokenizer: Any) -> bool:
    """Whether the chat template takes ``tools`` and asks for ``<tool_call>`` answers (what our parser reads)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the tool one, if any, else the default
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "<tool_call>" in template


@dataclass(frozen=True)
class ChatRules:
    """How one model turns a conversation into prompt tokens."""

    fold_system: bool = False
    native_tools: bool = False  # the template renders ``tools`` and tool calls itself, the Hermes way

    @classmethod
    def for_model(cls, config: dict, tokenizer: Any) -> ChatRules:
        """The rules for a model from its ``config.json`` (its family) and its tokenizer (its template)."""
        from solverx.models.prepare import text_config_of

        family = text_config_of(config).get("model_type", "")
        fold = family in NO_SYSTEM_ROLE or not _template_accepts_system(tokenizer)
        return cls(fold_system=fold, native_tools=_template_renders_hermes_tools(tokenizer))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ChatRules:
        """The rules from the template alone, where no config is at hand (Gemma's template raises on a system turn)."""
        fold = not _template_accepts_system(tokenizer)
        return cls(fold_system=fold, native_tools=_template_renders_hermes_tools(tokenizer))

    def messages(self, messages: Sequence[Message]) -> list[Message]:
        """The messages as this model's template takes them."""
        return fold_system_message(messages) if self.fold_system else [dict(m) for m in messages]

    def render(
        self, tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool, tools: list | None = None
    ) -> str:
        """The chat as text; ``tools`` (OpenAI's tool list) only for a template with :attr:`native_tools`."""
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(
            self.messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )

    def encode(
        self, tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool, tools: list | None = None
    ) -> list[int]:
        """Token ids of the rendered chat; the template carries every special token, so none is added."""
        text = self.render(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return list(tokenizer.encode(text, add_special_tokens=False))
