"""Streaming text: incremental detokenisation and stop strings.

The invariant both keep: the concatenation of every emitted delta equals the final text.
Text is held back while the last bytes decode to an incomplete character (U+FFFD) and while
its tail could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes one token at a time (the prefix/read offset scheme of TGI).

    Decoding a window that starts a few tokens back keeps byte-level merges and multi-byte
    characters right, at O(1) cost per token instead of re-decoding the whole text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._fast = _backend(tokenizer)
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add a token; return the newly completed text (maybe empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of tokens not yet returned (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]

def _backend(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` behind a transformers tokenizer whose decode (without
    clean-up) is exactly that tokenizer's decode, else None. Called twice per generated token,
    transformers' wrapper costs more than the decode itself (argument conversion, per call)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its own decode
        return None
    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer._tokenizer
    return None

class StopStrings:
    """Finds stop strings in generated text and says how much text is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, searched: int) -> int:
        """Index of the earliest stop string in `text`, or -1.

        Only the region that could contain a new match is searched: matches ending after
        `searched - longest + 1`.
        """
        if not self.stops:
            return -1
        lo = max(0, searched - self._longest + 1)
        hits = [i for s in self.stops if (i := text.find(s, lo)) >= 0]
        return min(hits, default=-1)

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that can be emitted: no suffix beyond it may still
        become a stop string."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - k
        return len(text)
