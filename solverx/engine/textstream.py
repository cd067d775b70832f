"""Incremental detokenization with stop strings.

Text that might be the start of a stop string is held back until it is clear either way, so a client never
receives part of a stop sequence and the final text ends exactly before it.
"""

from __future__ import annotations


class TextStream:
    """Feeds tokens through a streaming detokenizer and yields only text that is safe to send."""

    def __init__(self, detokenizer, stop: tuple[str, ...] = ()):
        self._detokenizer = detokenizer
        self._stop = tuple(s for s in stop if s)
        self._sent = 0
        self.stopped = False

    def _text(self) -> str:
        return self._detokenizer.text

    def push(self, token: int) -> str:
        """Add one token; returns the newly releasable text (may be empty). Sets ``stopped`` on a stop string."""
        self._detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back at the end of generation."""
        self._detokenizer.finalize()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._text()
        if self._stop:
            start = max(0, self._sent - max(len(s) for s in self._stop))
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                out, self._sent = text[self._sent : end], max(self._sent, end)
                return out
            if not final:
                text = text[: len(text) - _held_suffix(text, self._stop)]
        if not final and text.endswith("\ufffd"):
            text = text[:-1]  # an incomplete multi-byte character; wait for its other bytes
        out = text[self._sent :]
        self._sent = max(self._sent, len(text))
        return out


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
