"""Turning generated ids into streamed tokens: incremental detokenization and stop strings.

Decoding one id at a time is wrong for most tokenizers (WordPiece joins ``##`` pieces,
SentencePiece and byte-level BPE split characters across ids), so each token's text is the
difference between decoding a short window with and without it, as Hugging Face TGI does.

Stop strings are matched on the decoded text, and the stop string itself is never streamed:
tokens whose text could be the start of a stop string are held back until the text either
completes the stop string (they are dropped; a token that straddles its start is streamed
with the text before it) or rules it out (they are released).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Ids decoded before the newest token to give the decoder its context (spaces, merges).
_LOOKBACK_TOKENS = 5


@dataclass
class _HeldToken:
    token_id: int
    text: str


class TextStream:
    """Feeds one job's answer ids and says which tokens to stream and whether a stop matched.

    ``already_streamed`` are ids an earlier attempt streamed: they give the decoder context
    and count towards stop-string matching, and are not streamed again.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: tuple[str, ...] = (),
        already_streamed: tuple[int, ...] = (),
    ) -> None:
        self._decode = decode
        self._stop = stop
        self._ids = list(already_streamed)
        self._prefix_offset = max(0, len(self._ids) - _LOOKBACK_TOKENS)
        self._read_offset = len(self._ids)
        # An earlier attempt may have stopped inside a multi-id character (its last ids
        # streamed with empty text): read from before them, so the id that completes the
        # character releases all of it instead of its text being lost at the resume point.
        while self._read_offset > 0 and self._tail_incomplete():
            self._read_offset -= 1
        self._prefix_offset = min(self._prefix_offset, max(0, self._read_offset - 1))
        # Only the tail of the streamed text can take part in a stop match.
        self._streamed_tail = decode(self._ids) if stop else ""
        self._held: list[_HeldToken] = []
        self.next_index = len(self._ids)
        self.stopped = False

    def _tail_incomplete(self) -> bool:
        window = self._ids[max(0, self._read_offset - _LOOKBACK_TOKENS) : self._read_offset]
        return self._decode(window).endswith("\ufffd")

    def _delta_text(self) -> str:
        """Text the newest id adds; empty while it only starts a multi-id character."""
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return after[len(before) :]
        return ""

    def push(self, token_id: int) -> list[tuple[int, int, str]]:
        """Add a generated id; return (index, id, text) of the tokens now safe to stream."""
        self._ids.append(token_id)
        self._held.append(_HeldToken(token_id, self._delta_text()))
        if not self._stop:
            return self._release(len(self._held))
        held_text = "".join(token.text for token in self._held)
        window = self._streamed_tail + held_text
        start_of_held = len(self._streamed_tail)
        match = _earliest_stop(window, self._stop, not_before=0)
        if match is not None:
            self.stopped = True
            return self._release_before(match - start_of_held)
        keep = _partial_stop_suffix(window, self._stop)
        releasable_chars = len(held_text) - keep
        count, used = 0, 0
        for token in self._held:
            if used + len(token.text) > releasable_chars:
                break
            used += len(token.text)
            count += 1
        return self._release(count)

    def flush(self) -> list[tuple[int, int, str]]:
        """The generation ended without a stop match: everything held back is answer text."""
        return self._release(len(self._held))

    def _release(self, count: int) -> list[tuple[int, int, str]]:
        released, self._held = self._held[:count], self._held[count:]
        out = []
        for token in released:
            out.append((self.next_index, token.token_id, token.text))
            self.next_index += 1
        if self._stop and released:
            longest = max(len(stop) for stop in self._stop)
            tail = self._streamed_tail + "".join(token.text for token in released)
            self._streamed_tail = tail[-longest:]
        return out

    def _release_before(self, chars: int) -> list[tuple[int, int, str]]:
        """Stream the held text before the stop string (``chars`` characters); a token that
        straddles the stop's start keeps only its text before it."""
        out: list[tuple[int, int, str]] = []
        used = 0
        for token in self._held:
            if used >= chars:
                break
            text = token.text[: chars - used]
            used += len(token.text)
            out.append((self.next_index, token.token_id, text))
            self.next_index += 1
        self._held = []
        return out


def _earliest_stop(text: str, stops: tuple[str, ...], not_before: int) -> int | None:
    """Start of the first stop string found in ``text`` at or after ``not_before``."""
    found = [pos for stop in stops if (pos := text.find(stop, not_before)) >= 0]
    return min(found) if found else None


def _partial_stop_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
