"""Incremental detokenization: turn a growing list of token ids into newly printable text.

Decoding token by token is wrong in two ways: a multi-byte character split over several byte-level
tokens decodes to U+FFFD until its last byte arrives, and some tokenizers only know whether a token
starts with a space once they see its left neighbour. So each step decodes a short window of
recent ids and prints only what the window added past the text it had already produced, holding
back output that ends in an incomplete character.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed ids with `push`; it returns the text that became final (possibly "")."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are already fully printed
        self._read = 0  # ids up to here have been printed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


__all__ = ["TextStream"]
