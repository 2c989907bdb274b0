"""Streaming text: incremental detokenisation, stop strings, and TokenSink's chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eftmesh.combiner.stream import Chunk, FinishReason, TokenSink, Usage
from eftmesh.combiner.text import REPLACEMENT, IncrementalDetokenizer, StopStrings

MULTIBYTE_TEXTS = [
    "Émile a visité Zürich — naïve café.",
    "東京 and 京都, 北京",
    "emoji 😀🎉 mid🚀word 👩‍👩‍👧",
    "Ελλάδα ÅÄÖ ñ ß",
    "plain ascii, no surprises",
    "😀",
    "mixed: é東😀x",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_family: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_family["base-small"]))


def full_decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --- IncrementalDetokenizer -------------------------------------------------------------------


def test_the_tiny_tokenizer_splits_multibyte_characters_across_tokens(tokenizer):
    # Precondition of the tests below: some tokens alone are incomplete UTF-8.
    ids = tokenizer.encode("東京 😀")
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_and_flush_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    tail = detok.flush()
    assert "".join(deltas) + tail == full_decode(tokenizer, ids) == text
    assert tail == ""  # valid text leaves nothing held back once complete


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_no_delta_contains_a_replacement_character_for_valid_text(tokenizer, text):
    detok = IncrementalDetokenizer(tokenizer)
    for t in tokenizer.encode(text):
        assert REPLACEMENT not in detok.push(t)


def test_a_character_split_across_tokens_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(t) for t in ids]
    assert out[:-1] == [""] * (len(ids) - 1)
    assert out[-1] == "😀"


def test_flush_returns_an_incomplete_character_as_a_replacement(tokenizer):
    ids = tokenizer.encode("ab😀")
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(t) for t in ids[:-1])  # the emoji's last byte never comes
    text += detok.flush()
    assert text.startswith("ab")
    assert text.endswith(REPLACEMENT)
    assert text == full_decode(tokenizer, ids[:-1])


def test_special_tokens_add_no_text(tokenizer):
    ids = tokenizer.encode("hi")
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(t) for t in [*ids, tokenizer.eos_token_id, *ids])
    assert text + detok.flush() == "hihi"


# --- StopStrings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stops,text,searched,expected",
    [
        (["wor"], "hello world", 0, 6),
        (["lo", "he"], "hello", 0, 0),  # the earliest hit wins, whichever stop it is
        (["xyz"], "hello world", 0, -1),
        ([], "hello", 0, -1),
        ([""], "hello", 0, -1),  # empty stop strings are ignored, not matched everywhere
        (["STOP"], "abSTOP", 4, 2),  # a match straddling the already-searched end is found
        (["STOP"], "abSTOPxy", 8, -1),  # one wholly inside the searched region is not new
        (["\n\n", "END"], "a\nb\n\nEND", 3, 3),
        (["é東"], "café東京", 3, 3),
    ],
)
def test_stop_strings_find(stops, text, searched, expected):
    assert StopStrings(stops).find(text, searched) == expected


@pytest.mark.parametrize(
    "stops,text,expected",
    [
        (["</s>"], "hello", 5),
        (["</s>"], "hello <", 6),
        (["</s>"], "hello </", 6),
        (["</s>"], "hello </s", 6),
        (["</s>"], "hello </x", 9),
        (["</s>"], "", 0),
        (["abc", "bd"], "xab", 1),  # "ab" may still become "abc"
        (["abc", "bd"], "xb", 1),  # "b" may still become "bd"
        (["abc", "bd"], "xba", 2),  # "a" may still become "abc"; "ba" is nothing
        (["aaa"], "baa", 1),  # the longest held-back tail wins
        ([], "anything", 8),
        (["x"], "abc", 3),  # a one-character stop is found whole, never held back
    ],
)
def test_stop_strings_safe_length(stops, text, expected):
    assert StopStrings(stops).safe_length(text) == expected


# --- TokenSink --------------------------------------------------------------------------------


def run_sink(tokenizer: Any, ids: list[int], stops=(), max_new: int = 100, room: int = 100) -> tuple[TokenSink, list[Chunk]]:
    """Feed ids one at a time as the decoding loop does; stop when the sink says so."""
    sink = TokenSink(tokenizer, {tokenizer.eos_token_id}, tuple(stops), max_new, room, Usage(prompt_tokens=4))
    chunks = []
    for i, t in enumerate(ids):
        done = sink.add(t, -0.5 * i)
        chunks.append(sink.take())
        if done:
            break
    return sink, chunks


def assert_stream_invariants(sink: TokenSink, chunks: list[Chunk]) -> None:
    emitted = ""
    for c in chunks:
        emitted += c.text
        assert sink.text.startswith(emitted)  # nothing is ever emitted that is later taken back
    assert emitted == sink.text
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == sink.finish_reason is not None
    assert chunks[-1].usage is sink.usage


def test_a_stop_string_spanning_two_tokens_is_cut_and_never_emitted(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    stop = "fox"
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # precondition: it spans tokens
    sink, chunks = run_sink(tokenizer, ids, stops=[stop])
    assert sink.finish_reason == FinishReason.STOP
    assert sink.text == "The quick brown "
    assert_stream_invariants(sink, chunks)
    assert "f" not in "".join(c.text for c in chunks)
    # generation ended at the token that completed the stop string
    assert [t for c in chunks for t in c.token_ids] == ids[: len(chunks)]
    assert tokenizer.decode(ids[: len(chunks)]).endswith("fox")


def test_a_stop_string_at_the_very_start_gives_empty_text(tokenizer):
    ids = tokenizer.encode("The quick brown fox")
    sink, chunks = run_sink(tokenizer, ids, stops=["The"])
    assert sink.finish_reason == FinishReason.STOP
    assert sink.text == ""
    assert_stream_invariants(sink, chunks)


def test_a_partial_stop_string_is_held_back_then_released(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    sink, chunks = run_sink(tokenizer, ids, stops=["fox jumps under"], max_new=len(ids))
    assert sink.finish_reason == FinishReason.LENGTH
    assert sink.text == text
    assert_stream_invariants(sink, chunks)
    # while "fox jumps " might still have become the stop string, it was held back
    so_far = ""
    for c in chunks[:-1]:
        so_far += c.text
        assert not so_far.endswith("fox jumps ")


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("Answer: Mara lives in Dunmore.")
    sink, chunks = run_sink(tokenizer, ids, stops=["Dunmore", "lives"])
    assert sink.finish_reason == FinishReason.STOP
    assert sink.text == "Answer: Mara "
    assert_stream_invariants(sink, chunks)


def test_chunks_concatenate_to_the_final_text_across_multibyte_characters(tokenizer):
    text = "mixed: é東😀x and 東京"
    ids = tokenizer.encode(text)
    sink, chunks = run_sink(tokenizer, ids, max_new=len(ids))
    assert sink.text == text
    assert_stream_invariants(sink, chunks)
    assert all(REPLACEMENT not in c.text for c in chunks)


def test_eos_ends_the_generation_with_finish_eos(tokenizer):
    ids = tokenizer.encode("Hello there")
    eos = tokenizer.eos_token_id
    sink, chunks = run_sink(tokenizer, [*ids, eos, *ids])
    assert sink.finish_reason == FinishReason.EOS
    assert sink.text == "Hello there"
    assert_stream_invariants(sink, chunks)
    assert chunks[-1].token_ids == [eos]
    assert sink.usage.completion_tokens == len(ids) + 1  # the EOS token counts
    assert sink.usage.prompt_tokens == 4


def test_eos_releases_text_held_back_for_a_possible_stop_string(tokenizer):
    ids = tokenizer.encode("Hello th")
    sink, chunks = run_sink(tokenizer, [*ids, tokenizer.eos_token_id], stops=["there"])
    assert sink.finish_reason == FinishReason.EOS
    assert sink.text == "Hello th"
    assert_stream_invariants(sink, chunks)


def test_max_new_tokens_ends_the_generation_with_finish_length(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    sink, chunks = run_sink(tokenizer, ids, max_new=5)
    assert sink.finish_reason == FinishReason.LENGTH
    assert len(chunks) == 5
    assert sink.usage.completion_tokens == 5
    assert sink.text == tokenizer.decode(ids[:5])
    assert_stream_invariants(sink, chunks)


def test_running_out_of_context_ends_the_generation_with_finish_context(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    sink, chunks = run_sink(tokenizer, ids, max_new=50, room=4)
    assert sink.finish_reason == FinishReason.CONTEXT
    assert len(chunks) == 4
    assert_stream_invariants(sink, chunks)


def test_logprobs_travel_with_their_tokens(tokenizer):
    ids = tokenizer.encode("The quick brown")
    sink, chunks = run_sink(tokenizer, ids, max_new=len(ids))
    assert [lp for c in chunks for lp in c.logprobs] == [-0.5 * i for i in range(len(ids))]
    assert [t for c in chunks for t in c.token_ids] == ids
