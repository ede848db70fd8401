"""The incremental text/event-stream parser, pure: bytes in, events and measured paths out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.telemetry.events import MAX_LINE, EventStream

TOKENS = ("usage", "total_tokens")
SUCCESS = ("success",)
WANTED = (TOKENS, SUCCESS)
ENDINGS = (b"\r\n", b"\n", b"\r")


def parsed(chunks: Iterable[bytes], wanted: tuple[tuple[str, ...], ...] = WANTED
           ) -> EventStream:
    stream = EventStream(wanted)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return stream


def outcome(stream: EventStream) -> tuple[int, dict[tuple[str, ...], Any], Any]:
    return stream.events, dict(stream.paths), stream.last_json


def data(document: Any) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


# An OpenAI chat-completions stream: a role chunk, content deltas, a usage chunk, [DONE].
CHAT = b"".join([
    b": keep-alive\n\n",
    data({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
    data({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
    b"event: message\nid: 3\n" + data({"id": "c1", "choices": [{"delta": {"content": "lo"}}]}),
    data({"id": "c1", "choices": [], "usage": {"prompt_tokens": 34, "completion_tokens": 1200,
                                               "total_tokens": 1234}}),
    b"data: [DONE]\n\n",
])
CHAT_LAST = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 34, "completion_tokens": 1200,
                                                  "total_tokens": 1234}}


def test_openai_chat_stream_gives_its_usage_and_counts_every_event() -> None:
    stream = parsed([CHAT])
    assert stream.events == 5  # the comment is not an event; [DONE] is one
    assert stream.paths == {TOKENS: 1234}
    assert stream.last_json == CHAT_LAST  # [DONE] is not JSON and replaces nothing


@pytest.mark.parametrize("ending", ENDINGS, ids=["crlf", "lf", "cr"])
def test_every_line_ending_gives_the_same_events(ending: bytes) -> None:
    stream = parsed([CHAT.replace(b"\n", ending)])
    assert outcome(stream) == (5, {TOKENS: 1234}, CHAT_LAST)


def test_mixed_line_endings_in_one_stream() -> None:
    text = b'data: {"usage": {"total_tokens": 1}}\r\n\r\ndata: {"usage": {"total_tokens": 2}}\n\r' \
           b'data: {"usage": {"total_tokens": 3}}\r\n'
    stream = EventStream(WANTED)
    stream.feed(text)
    assert stream.events == 2 and stream.paths == {TOKENS: 2}
    stream.close()
    assert stream.events == 3 and stream.paths == {TOKENS: 3}


def test_an_event_is_dispatched_only_at_its_blank_line() -> None:
    stream = EventStream(WANTED)
    stream.feed(b'data: {"usage": {"total_tokens": 5}}\n')
    assert stream.events == 0 and stream.paths == {}
    stream.feed(b"\n")
    assert stream.events == 1 and stream.paths == {TOKENS: 5}


def test_crlf_split_between_chunks_is_one_line_end_not_two() -> None:
    stream = EventStream(WANTED)
    # Had the CR been taken as a line end on its own, the LF would be a blank line that
    # dispatches the half-built event; it must wait for the second data line.
    stream.feed(b'data: {"usage":\r')
    stream.feed(b'\ndata: {"total_tokens": 9}}\r\n')
    assert stream.events == 0
    stream.feed(b"\r\n")
    assert stream.events == 1 and stream.paths == {TOKENS: 9}


def test_comments_and_other_fields_are_not_data() -> None:
    stream = parsed([b": ping\n\n:\n\nid: 7\nevent: update\nretry: 10\n\n"
                     b': inside\ndata: {"usage": {"total_tokens": 4}}\n: more\n\n'])
    assert stream.events == 1  # events with no data line are never dispatched
    assert stream.paths == {TOKENS: 4}


def test_multi_line_data_joins_with_line_feed() -> None:
    stream = parsed([b'data: {"usage":\ndata: {"total_tokens": 77},\ndata:"success": false}\n\n'])
    assert stream.events == 1
    assert stream.last_json == {"usage": {"total_tokens": 77}, "success": False}
    assert stream.paths == {TOKENS: 77, SUCCESS: False}


def test_one_leading_space_is_dropped_and_no_space_is_fine() -> None:
    stream = parsed([b'data:{"usage": {"total_tokens": 1}}\n\n'])
    assert stream.last_json == {"usage": {"total_tokens": 1}}
    stream = parsed([b"data:  x\n\n", b'data: {"usage": {"total_tokens": 2}}\n\n'])
    assert stream.events == 2 and stream.paths == {TOKENS: 2}


def test_json_data_after_whitespace_is_still_measured() -> None:
    assert parsed([b'data:  {"usage": {"total_tokens": 2}}\n\n']).paths == {TOKENS: 2}
    assert parsed([b'data:\ndata: {"usage": {"total_tokens": 3}}\n\n']).paths == {TOKENS: 3}


def test_done_sentinel_counts_as_an_event_and_keeps_the_figures() -> None:
    stream = parsed([data({"usage": {"total_tokens": 8}, "success": True}),
                     b"data: [DONE]\n\n"])
    assert stream.events == 2
    assert stream.paths == {TOKENS: 8, SUCCESS: True}
    assert stream.last_json == {"usage": {"total_tokens": 8}, "success": True}


def test_last_event_carrying_the_path_wins() -> None:
    stream = parsed([data({"usage": {"total_tokens": 10}}),
                     data({"usage": {"total_tokens": 20}, "success": False}),
                     data({"choices": [{"delta": {"content": "x"}}]}),  # carries neither
                     data({"usage": None}),  # null is not a value carried
                     data({"usage": {"prompt_tokens": 3}}),  # a sibling path only
                     b"data: [DONE]\n\n"])
    assert stream.paths == {TOKENS: 20, SUCCESS: False}
    assert stream.last_json == {"usage": {"prompt_tokens": 3}}


def test_nothing_is_parsed_when_no_path_is_wanted() -> None:
    stream = parsed([CHAT], wanted=())
    assert stream.events == 5 and stream.paths == {} and stream.last_json is None


def test_final_event_without_blank_line_counts_at_close() -> None:
    for tail in (b"", b"\n", b"\r\n", b"\r"):
        stream = EventStream(WANTED)
        stream.feed(data({"usage": {"total_tokens": 1}}))
        stream.feed(b'data: {"usage": {"total_tokens": 2}}' + tail)
        assert stream.events == 1 and stream.paths == {TOKENS: 1}
        stream.close()
        assert stream.events == 2 and stream.paths == {TOKENS: 2}, tail
        assert stream.last_json == {"usage": {"total_tokens": 2}}, tail


def test_a_data_line_with_no_colon_is_empty_data() -> None:
    stream = parsed([b"data\n\n", b"data\r\r", b"data\r\n\r\n"])
    assert stream.events == 3


def test_final_line_ended_by_a_lone_cr_counts_at_close() -> None:
    assert parsed([b"data: x\r"]).events == 1  # a colon keeps the field name clean
    assert parsed([b"data\r"]).events == 1


def test_close_twice_counts_nothing_twice() -> None:
    stream = EventStream(WANTED)
    stream.feed(b'data: {"usage": {"total_tokens": 2}}')
    stream.close()
    stream.close()
    assert stream.events == 1


STEP = 64 * 1024
LONG_JSON = data({"usage": {"total_tokens": 999}, "pad": "x" * (MAX_LINE + 4 * STEP)})


def test_over_long_line_streamed_in_pieces_is_skipped_and_the_stream_recovers() -> None:
    text = data({"usage": {"total_tokens": 7}}) + LONG_JSON + data({"success": True})
    stream = parsed(text[i:i + STEP] for i in range(0, len(text), STEP))
    assert stream.paths == {TOKENS: 7, SUCCESS: True}  # 999 was on a line never measured
    assert stream.events == 2
    assert stream.held <= MAX_LINE  # memory stays bounded


def seconds_per_piece(line_bytes: int, piece: int = 1024) -> float:
    """Best of three: the time to feed one data line of `line_bytes` in `piece`-byte
    chunks, per chunk."""
    text = b"data: " + b"x" * (line_bytes - 7) + b"\n\n"
    pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
    best = float("inf")
    for _ in range(3):
        stream = EventStream(WANTED)
        started = time.perf_counter()
        for chunk in pieces:
            stream.feed(chunk)
        best = min(best, time.perf_counter() - started)
        assert stream.events == 1
    return best / len(pieces)


def test_a_long_line_in_small_pieces_costs_the_same_per_piece_as_a_short_one() -> None:
    """Each piece's bytes are scanned once: a 1 MiB line in 1 KiB pieces costs per piece
    what a 64 KiB line does. Re-joining and re-scanning the open line on every piece made
    it 16 times as much (O(n²): 42 ms for the line, 3 ms now)."""
    ratio = seconds_per_piece(MAX_LINE) / seconds_per_piece(MAX_LINE // 16)
    assert ratio < 4, ratio


def test_over_long_line_is_skipped_however_it_is_chunked() -> None:
    text = data({"usage": {"total_tokens": 7}}) + LONG_JSON
    assert parsed([text]).paths == {TOKENS: 7}


def test_over_long_line_ended_by_cr_at_a_chunk_end_skips_only_itself() -> None:
    stream = EventStream(WANTED)
    stream.feed(b"data: " + b"x" * (MAX_LINE + 10) + b"\r")
    stream.feed(b'data: {"usage": {"total_tokens": 7}}\r\r')  # the event's next data line
    stream.close()
    assert stream.events == 1 and stream.paths == {TOKENS: 7}


def test_one_endless_event_keeps_memory_bounded() -> None:
    stream = EventStream((TOKENS,))
    line = b"data: " + b"x" * 1000 + b"\n"
    for _ in range(8_000):  # 8 MB of one event, as an SSE answer streams through the proxy
        stream.feed(line)
    held = stream.held
    assert held <= 2 * MAX_LINE, held


def test_every_split_point_gives_the_same_events() -> None:
    for text in (CHAT, CHAT.replace(b"\n", b"\r\n"), CHAT.replace(b"\n", b"\r")):
        whole = outcome(parsed([text]))
        for cut in range(len(text) + 1):
            assert outcome(parsed([text[:cut], text[cut:]])) == whole, (text, cut)
        assert outcome(parsed(text[i:i + 1] for i in range(len(text)))) == whole


# --- property: any chunking of any stream gives the same events and paths ------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
DOCUMENT = st.fixed_dictionaries(
    {}, optional={"usage": st.fixed_dictionaries(
        {}, optional={"total_tokens": st.integers(0, 10**6), "prompt_tokens": st.integers()}),
        "success": st.booleans(), "id": TEXT})
LINE = st.one_of(
    DOCUMENT.map(lambda d: b"data: " + json.dumps(d).encode()),
    TEXT.map(lambda t: b"data:" + t.encode()),
    st.just(b"data: [DONE]"),
    TEXT.map(lambda t: b":" + t.encode()),
    st.sampled_from([b"id: 1", b"event: message", b"retry: 100", b"data:"]),
)
EVENT = st.lists(st.tuples(LINE, st.sampled_from(ENDINGS)), min_size=1, max_size=4)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A stream and how many events it holds (the last one may lack its blank line)."""
    events = draw(st.lists(EVENT, max_size=6))
    text, count = b"", 0
    for index, lines in enumerate(events):
        text += b"".join(line + ending for line, ending in lines)
        count += any(line.startswith(b"data") for line, _ in lines)
        if index < len(events) - 1 or draw(st.booleans()):
            # A LF right after a CR would only complete that CRLF, not make a blank line.
            text += draw(st.sampled_from(ENDINGS[::2] if text.endswith(b"\r") else ENDINGS))
    return text, count


@settings(max_examples=300, deadline=None)
@given(streams(), st.data())
def test_any_chunking_gives_the_same_events_and_paths(stream: tuple[bytes, int],
                                                      draw: st.DataObject) -> None:
    text, count = stream
    cuts = sorted(draw.draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole = parsed([text])
    assert whole.events == count
    assert outcome(parsed(chunks)) == outcome(whole)


def test_a_cr_that_ends_a_chunk_is_not_mistaken_for_a_blank_line() -> None:
    # CR LF with the CR last in one chunk and the LF first in the next; then a CR that was a
    # real line end: the event ends only where the stream says it does.
    stream = EventStream(WANTED)
    stream.feed(b'data: {"usage": {"total_tokens": 3}}\r')
    stream.feed(b"\n\r")
    assert stream.events == 0  # that last CR may still be the start of a CRLF
    stream.feed(b"\n")
    assert stream.events == 1 and stream.paths == {TOKENS: 3}
