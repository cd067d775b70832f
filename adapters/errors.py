"""Every error the adapter store raises, in one hierarchy.

Each class carries a stable ``code`` string so the HTTP layer can map it to an OpenAI error body without
parsing messages: ``invalid_name`` and ``invalid_adapter`` are the caller's fault (400), ``model_not_found`` is
404, and ``base_mismatch`` / ``adapter_conflict`` mean the request clashes with what is already there (409).
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class: anything the registry or the validator refuses."""

    code = "adapter_error"


class InvalidAdapterName(AdapterError):
    """A name or model string that is not ``[a-z0-9][a-z0-9._-]{0,63}`` (optionally ``@<version>``)."""

    code = "invalid_name"


class AdapterNotFound(AdapterError):
    """No adapter of that name is registered."""

    code = "model_not_found"


class VersionNotFound(AdapterNotFound):
    """The adapter exists but not that version (never registered, or removed)."""

    code = "model_not_found"


class InvalidAdapter(AdapterError):
    """The files are not a LoRA adapter this base can serve; the message names the file, key and shapes."""

    code = "invalid_adapter"


class BaseMismatch(InvalidAdapter):
    """The adapter declares a base fingerprint other than the base it is being registered against."""

    code = "base_mismatch"


class AdapterConflict(AdapterError):
    """The operation contradicts the registry's state, e.g. removing the promoted version."""

    code = "adapter_conflict"
