"""Turning a growing list of token ids into text that is safe to send.

Text is released only when it is final: a token that ends in the middle of a UTF-8 character (or
a piece the tokenizer would merge with what follows) is held until the next tokens complete it,
and text that could be the start of a stop string is held until it cannot be.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decoding only the last few tokens keeps each step O(1); the window starts a few tokens back
# so that tokenizers which change a token's text depending on its left neighbour (leading
# spaces in SentencePiece) decode it the same way as in the full sequence.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that became final with it (maybe "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd") and full.startswith(prefix):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end of generation; bytes that never formed a character
        come out as U+FFFD, exactly as a full decode of the tokens would show them."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        if full.startswith(prefix):
            return full[len(prefix) :]
        return ""


@dataclass
class StopResult:
    text: str  # text that may be sent now
    stopped: bool  # a stop string was found; ``text`` ends just before it


class StopStringMatcher:
    """Finds stop strings across chunk boundaries; the stop string itself is never released."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> StopResult:
        if not self.stops:
            return StopResult(text, False)
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return StopResult(buffer[: min(hits)], True)
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:n]):
                    keep = n
                    break
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return StopResult(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
