"""Incremental detokenization and stop strings (pure logic, a toy vocabulary)."""

from __future__ import annotations

from services.worker.text import TextStream

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "User", 7: ":", 8: " again", 9: "!"}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def feed(stream: TextStream, ids: list[int]) -> list[tuple[int, int, str]]:
    out = []
    for token_id in ids:
        out += stream.push(token_id)
        if stream.stopped:
            return out
    return out + stream.flush()


def test_without_stop_strings_every_token_streams_at_once():
    stream = TextStream(decode)
    assert stream.push(1) == [(0, 1, "Hel")]
    assert stream.push(2) == [(1, 2, "lo")]
    assert stream.flush() == []


def test_stop_string_spanning_tokens_is_not_streamed():
    stream = TextStream(decode, stop=("\nUser:",))
    out = feed(stream, [1, 2, 5, 6, 7, 8])
    assert stream.stopped
    assert out == [(0, 1, "Hel"), (1, 2, "lo")]


def test_tokens_that_only_looked_like_a_stop_are_released():
    stream = TextStream(decode, stop=("\nUser:",))
    assert stream.push(1) == [(0, 1, "Hel")]
    assert stream.push(5) == []  # "\n" may start the stop string
    assert stream.push(6) == []
    assert stream.push(9) == [(1, 5, "\n"), (2, 6, "User"), (3, 9, "!")]
    assert not stream.stopped


def test_a_token_straddling_the_stop_keeps_its_text_before_it():
    stream = TextStream(decode, stop=("o wo",))
    out = feed(stream, [1, 2, 3, 4])
    assert stream.stopped
    assert out == [(0, 1, "Hel"), (1, 2, "l")]


def test_held_tokens_are_flushed_when_generation_ends():
    stream = TextStream(decode, stop=("\nUser:",))
    out = feed(stream, [1, 5, 6])
    assert not stream.stopped
    assert "".join(text for _, _, text in out) == "Hel\nUser"
    assert [index for index, _, _ in out] == [0, 1, 2]


def test_resumed_stream_continues_indexes_and_matches_across_attempts():
    stream = TextStream(decode, stop=("ld!",), already_streamed=(1, 2, 3))
    assert stream.push(4) == []
    assert stream.push(9) == []
    assert stream.stopped
    resumed = TextStream(decode, already_streamed=(1, 2))
    assert resumed.push(3) == [(2, 3, " wor")]
