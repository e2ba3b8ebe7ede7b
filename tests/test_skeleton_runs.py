"""Runs of small array elements cut out of a huge data line's skeleton as it arrives
(proxy/usage/array_runs.py, proxy/usage/skeleton.py): a `response.completed` with logprobs.

The skeleton must parse exactly when the whole line parses, to the same structure but for
runs of array elements that one marker stands for, and the tracker must reach the same answer
from it as from the whole event. Generated lines (arrays of logprobs-like objects, nested
arrays, strings that look like separators, escapes, non-ASCII text, NaN, integers past 64
bits, duplicate members, broken ones) are cut into random reads and compared with the whole
parse, in the skeleton alone and through two pumps (one passing the event through, one
completing it whole). Deterministic tests pin each way a run ends, and show that the end of
the line reads a skeleton of a few KiB, not the line.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fake_upstream import responses_events
from proxy.sse_large import LargeEvent
from proxy.usage import UsageChunkFilter
from proxy.usage import stream as usage_stream
from proxy.usage.array_runs import Run, Scan, cut_end, find_run, run_end
from proxy.usage.fast import parse_json
from proxy.usage.responses_events import response_head
from proxy.usage.skeleton import Skeleton, _sized
from tests.test_sse_pass import NEVER, _run
from tests.test_usage_plain import _FILTERS, _cut

_ALTERNATIVE = '{{"token":{t},"logprob":{lp},"bytes":[{b}]}}'
_TOKENS = st.one_of(
    st.text(max_size=6).map(lambda t: json.dumps(t)),
    st.text(max_size=4).map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.sampled_from(
        [
            '"]},{\\"token\\":"',  # the separator, escaped inside a string
            '",{\\"a\\":1},{\\"a\\":1},{\\"a\\":1},"',
            '"\\\\"',
            '"é,{["',
            '"\\u00e9\\ud83d\\ude00"',
            '"\\ud800"',  # a lone surrogate: msgspec refuses it, json.loads reads it
            '"\\u0000"',  # the markers' own escape
        ]
    ),
)
_NUMBERS = st.one_of(
    st.sampled_from(
        ["-0.125", "-2.5", "0", "1e999", "NaN", "-Infinity", "123456789012345678901234567890"]
    ),
    st.integers(-(10**6), 10**6).map(str),
)


@st.composite
def _element(draw: st.DrawFn) -> str:
    alternatives = ",".join(
        _ALTERNATIVE.format(t=draw(_TOKENS), lp=draw(_NUMBERS), b=draw(_NUMBERS))
        for _ in range(draw(st.integers(0, 2)))
    )
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return f"[{draw(_NUMBERS)},[{draw(_TOKENS)}]]"  # arrays in an array
    token, logprob = draw(_TOKENS), draw(_NUMBERS)
    if shape == 1:  # a duplicate member
        return f'{{"token":{token},"token":{draw(_TOKENS)},"top_logprobs":[{alternatives}]}}'
    return f'{{"token":{token},"logprob":{logprob},"top_logprobs":[{alternatives}]}}'


@st.composite
def _line(draw: st.DrawFn) -> str:
    """A Responses lifecycle event's data (or, now and then, a chat chunk's), its bulk one or
    two arrays of small elements, perhaps broken."""
    elements = draw(st.lists(_element(), min_size=1, max_size=6))
    count = draw(st.integers(3, 80))
    logprobs = ",".join(elements[i % len(elements)] for i in range(count))
    spaced = draw(st.booleans())
    if spaced:
        logprobs = logprobs.replace("},{", "}, {")
    part = f'{{"type":"output_text","text":{draw(_TOKENS)},"logprobs":[{logprobs}]}}'
    parts = ",".join([part] * draw(st.integers(1, 2)))
    usage = '{"input_tokens":3,"output_tokens":' + draw(_NUMBERS) + "}"
    response = f'{{"id":{draw(_TOKENS)},"output":[{{"content":[{parts}]}}],"usage":{usage}}}'
    kind = draw(
        st.sampled_from(
            ["response.completed", "response.in_progress", "response.output_text.delta"]
        )
    )
    line = f'{{"type":"{kind}","response":{response}}}'
    if draw(st.integers(0, 5)) == 0:  # duplicate members: the last one counts
        line = line[:-1] + ',"response":{"id":"second","usage":null}}'
    if draw(st.integers(0, 7)) == 0:
        choice = f'{{"index":0,"delta":{{"content":"x"}},"logprobs":{{"content":[{logprobs}]}}}}'
        line = f'{{"id":"c","choices":[{choice}]}}'
    if draw(st.integers(0, 4)) == 0:  # broken somewhere
        at = draw(st.integers(0, len(line) - 1))
        line = (
            line[:at] + draw(st.sampled_from(["", "]", "}", '"', ",", "\\", "{"])) + line[at + 1 :]
        )
    return line


# String markers at least as long as the member names accounting reads (`finish_reason`), as
# in production (4096): a shorter one may stand for such a name, which the lifecycle head
# then misses (the whole line's does not).
_RUNS = [16, 24, 32]


def _parsed(text: str) -> Any:
    try:
        return ("ok", parse_json(text))
    except ValueError:
        return ("bad",)
    except RecursionError:
        return ("deep",)


def _stands_for(got: Any, want: Any, runs: list[int]) -> bool:
    """Whether the parsed skeleton `got` stands for the whole line's `want`: equal but that a
    string with markers has the whole string's length and a cut marker stands for one or more
    elements of its array."""
    if isinstance(got, str):
        return isinstance(want, str) and len(_sized(got, runs)) == len(want)
    if isinstance(got, dict):
        return (
            isinstance(want, dict)
            and [len(_sized(k, runs)) for k in got] == [len(k) for k in want]
            and all(
                _stands_for(v, w, runs) for v, w in zip(got.values(), want.values(), strict=True)
            )
        )
    if isinstance(got, list):
        return isinstance(want, list) and _list_stands_for(got, want, runs)
    return bool(got == want or (got != got and want != want))  # (NaN)


def _marked(value: Any) -> bool:
    """Whether a marker is anywhere in a parsed skeleton's value."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_marked(k) or _marked(v) for k, v in value.items())
    return isinstance(value, list) and any(map(_marked, value))


def _list_stands_for(got: list[Any], want: list[Any], runs: list[int]) -> bool:
    """Each cut marker of `got` stands for one or more consecutive elements of `want`."""
    seen: set[tuple[int, int]] = set()

    def match(i: int, j: int) -> bool:
        if (i, j) in seen:
            return False
        seen.add((i, j))
        if i == len(got):
            return j == len(want)
        value = got[i]
        if isinstance(value, str) and value.startswith("\x00["):
            return any(match(i + 1, k) for k in range(j + 1, len(want) + 1))
        return j < len(want) and _stands_for(value, want[j], runs) and match(i + 1, j + 1)

    return match(0, 0)


def _skeleton(data: bytes, cuts: list[int], run: int) -> Skeleton:
    skeleton = Skeleton(run)
    pieces = _cut(data, cuts) or [b""]
    for n, piece in enumerate(pieces):
        skeleton.feed(piece, final=n == len(pieces) - 1)
    return skeleton


@settings(max_examples=300, deadline=None)
@given(_line(), st.lists(st.integers(0, 10**6), max_size=12), st.sampled_from(_RUNS))
def test_the_skeleton_parses_as_the_whole_line(line: str, cuts: list[int], run: int) -> None:
    """The skeleton parses iff the line does (the same failure), to the line's structure but
    for cut runs; the lifecycle head read from it is the line's."""
    data = line.encode("utf-8", "surrogatepass")
    skeleton = _skeleton(data, cuts, run)
    text = skeleton.text()
    whole_text = data.decode("utf-8", "replace")
    if not text:
        assert "\\u0000" in whole_text
        return
    got, want = _parsed(text), _parsed(whole_text)
    assert got[0] == want[0]
    if got[0] == "ok":
        assert _stands_for(got[1], want[1], skeleton.runs)
    head = response_head(text)
    whole_head = response_head(whole_text)
    if head is None:
        # (a value the head reads, its type, is a string marker: the caller reads it whole)
        assert whole_head is None or "\x00" in got[1]["type"]
        return
    restored = skeleton.restore(head)
    assert restored == whole_head or (restored is None and _marked(head))


@settings(max_examples=150, deadline=None)
@given(
    _line(),
    st.lists(st.integers(0, 10**6), max_size=10),
    st.sampled_from(_RUNS),
    st.sampled_from(["forward", "holding"]),
)
def test_a_huge_event_with_runs_agrees_with_the_whole_one(
    line: str, cuts: list[int], run: int, mode: str
) -> None:
    """Through the pump: per read the same tracker, record and marks, the same failure, the
    same client bytes as the event completed whole (but the documented difference)."""
    event = b"event: response.completed\ndata: " + line.encode("utf-8", "surrogatepass") + b"\n\n"
    reads = _cut(event + b"data: [DONE]\n\n", cuts)
    for chunk_filter in _FILTERS:
        got = _run(reads, chunk_filter, 64, run=run, holding=mode == "holding")
        want = _run(reads, chunk_filter, NEVER, run=run, holding=mode == "holding")
        assert got[0] == want[0]
        parsed = _parsed(line)
        if mode == "holding" or (parsed[0] == "ok" and isinstance(parsed[1], dict)):
            # (a malformed event whose start went out is relayed: test_sse_pass.py's own test)
            assert got[1] == want[1]


def _logprobs_event(tokens: int) -> bytes:
    return responses_events(tokens)[-1]


def test_the_end_of_a_logprobs_event_reads_a_small_skeleton() -> None:
    """Not vacuous: the bench's `response.completed` with 3,000 tokens' logprobs (1 MiB) is
    cut as it arrives, and the head decode at its end reads a few KiB, with the whole event's
    answer and no whole read."""
    event = _logprobs_event(3000)
    assert len(event) > 1024 * 1024
    reads = _cut(event + b"data: [DONE]\n\n", list(range(64 * 1024, len(event), 64 * 1024)))
    seen: list[int] = []
    head = response_head

    def measuring(data: str) -> Any:
        seen.append(len(data))
        return head(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(usage_stream, "response_head", measuring)
        patch.setattr(LargeEvent, "whole", None)  # a whole read would fail
        got = _run(reads, UsageChunkFilter(), 256 * 1024, run=4096)
    want = _run(reads, UsageChunkFilter(), NEVER, run=4096)
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2] > 0  # passed through
    assert seen and max(seen) < 64 * 1024
    tracker_state = got[0][-1][1][0]
    assert tracker_state == want[0][-1][1][0]


def test_the_skeleton_of_a_logprobs_line_is_small() -> None:
    """The logprobs array is one marker: the skeleton is the JSON around it, the first and
    last elements and what the text string's marker leaves."""
    event = _logprobs_event(3000)
    line = event[event.index(b"data: ") + 6 : event.index(b"\n\n", 30)]
    skeleton = _skeleton(line, list(range(0, len(line), 100_000)), 4096)
    assert skeleton._cuts == 1
    assert len(skeleton.text()) < 64 * 1024
    whole = json.loads(line)
    assert skeleton.restore(response_head(skeleton.text()) or {}) == response_head(line.decode())
    assert _stands_for(json.loads(skeleton.text()), whole, skeleton.runs)


def _logprob(n: int) -> str:
    return f'{{"token":"t{n}","logprob":-0.5,"top_logprobs":[{{"token":"a","logprob":-1}}]}}'


def _feed_all(line: str, run: int = 16, step: int = 50) -> Skeleton:
    data = line.encode()
    return _skeleton(data, list(range(step, len(data), step)), run)


def test_two_arrays_are_each_cut_and_what_lies_between_is_kept() -> None:
    """A run's end (its `]`) ends the cut; the search goes on after it and finds the next."""
    array = ",".join(_logprob(n) for n in range(40))
    line = f'{{"a":[{array}],"between":{{"k":[1,2]}},"b":[{array}]}}'
    skeleton = _feed_all(line)
    assert skeleton._cuts == 2
    text = skeleton.text()
    assert '"between":{"k":[1,2]}' in text
    assert _stands_for(json.loads(text), json.loads(line), skeleton.runs)


def test_elements_that_change_shape_end_the_cut_and_stay_correct() -> None:
    """Separators that stop matching (the elements' start changes) leave the rest kept: the
    run is given up once the kept text grows past its bound."""
    first = ",".join(_logprob(n) for n in range(30))
    other = ",".join(f'{{"other":{n},"x":[{n}]}}' for n in range(300))
    line = f'{{"a":[{first},{other}]}}'
    skeleton = _feed_all(line, run=8)
    text = skeleton.text()
    assert skeleton._cuts >= 1
    assert _stands_for(json.loads(text), json.loads(line), skeleton.runs)


def test_a_broken_run_is_kept_and_fails_as_the_line() -> None:
    """Elements that do not read as values (a missing bracket after the separators were
    learned) fail the cut's check and the run's end: kept, and the skeleton fails to parse as
    the line does."""
    array = ",".join(_logprob(n) for n in range(60))
    broken = array.replace('"t30",', '"t30"', 1)
    line = f'{{"type":"response.completed","response":{{"output":[{broken}]}}}}'
    skeleton = _feed_all(line)
    assert _parsed(skeleton.text())[0] == _parsed(line)[0] == "bad"


def _deepest() -> int:
    """The deepest nesting the parse reads from here (it depends on the stack's depth)."""
    low, high = 1, 5000
    while low + 1 < high:
        mid = (low + high) // 2
        low, high = (mid, high) if _parsed("[" * mid + "]" * mid)[0] == "ok" else (low, mid)
    return low


def test_elements_nested_too_deep_for_the_parse_are_kept() -> None:
    """The check nests each piece at least as deep as the line does: elements that the line's
    parse cannot read (recursion) only at their depth in the line fail it and are kept, and
    the skeleton fails alike."""
    around = 40  # the array's depth in the line
    inner = _deepest() - around + 2
    deep = '{"v":' + "[" * inner + "]" * inner + "}"
    shallow = ['{"v":[1]}'] * 20
    array = ",".join([*shallow, deep, deep, *shallow])
    line = '{"a":' * (around - 1) + f"[{array}]" + "}" * (around - 1)
    assert _parsed(line)[0] == "deep"
    assert _parsed(f"[{deep}]")[0] == "ok"  # alone, each element reads
    skeleton = _feed_all(line, run=256, step=1000)
    assert skeleton._cuts == 1  # (the shallow elements before the deep ones)
    assert _parsed(skeleton.text())[0] == "deep"
    arrays = ",".join(["[[1]]"] * 60)  # arrays of arrays are runs too
    skeleton = _feed_all(f'{{"a":[{{"b":[{arrays}]}}]}}', run=4)
    assert skeleton._cuts == 1


def test_a_separator_in_a_string_is_not_cut() -> None:
    """Elements inside a string (`,[1],[1]...` as text, kept because each read of it is
    shorter than a string marker's least) are not an array: the search skips candidates
    whose quotes before them are odd, and the string stays whole."""
    fake = ",".join(["[1]"] * 200)
    inner = ",".join(_logprob(n) for n in range(40))
    line = f'{{"s":"x,{fake}","a":[{inner}]}}'
    skeleton = _feed_all(line, run=64, step=50)
    text = skeleton.text()
    assert skeleton._cuts == 1
    assert json.loads(text)["s"] == json.loads(line)["s"]
    assert _stands_for(json.loads(text), json.loads(line), skeleton.runs)


def test_a_cut_run_where_accounting_reads_is_read_whole() -> None:
    """A chat chunk whose `choices` is the run: restore refuses the skeleton (the caller then
    reads the event whole), and the pumps agree."""
    choices = ",".join(f'{{"index":0,"delta":{{"content":"w{n}"}}}}' for n in range(80))
    line = f'{{"id":"c","choices":[{choices}]}}'
    skeleton = _feed_all(line, run=8)
    assert skeleton._cuts == 1
    assert skeleton.restore(json.loads(skeleton.text())) is None
    event = f"data: {line}\n\ndata: [DONE]\n\n".encode()
    reads = _cut(event, list(range(100, len(event), 100)))
    for chunk_filter in _FILTERS:
        assert _run(reads, chunk_filter, 64, run=8)[:2] == _run(reads, chunk_filter, NEVER)[:2]


def _find(text: str, *, window: int = 64, reach: int = 8) -> tuple[int, str, int] | None:
    return find_run(text, Scan(False), window=window, reach=reach, tries=8)


def test_the_pieces_of_array_runs() -> None:
    """The module's searches at their edges."""
    # A non-ASCII element: msgspec counts bytes, the search characters.
    text = ',{"é":1},{"é":2},{"é":3},{"é":4}'
    assert _find(text) == (1, '},{"é":', 1)
    # The text ends right after the array; an array that does not go on far enough.
    assert run_end("[1,2]", 1) == 5
    assert run_end("[1,2] ,3", 1) == 6
    assert run_end("[1,2", 1) is None
    assert run_end("[1,:", 1) == -1
    assert run_end("[" + "[" * 3000 + "]" * 3000, 1) == -1
    assert _find(',{"a":1},{"a":2},{"a":3}]', reach=100) is None
    # The candidates looked at are bounded: the scan stops on the next and says where.
    many = ',{"a":1}' * 3 + ",{" * 50
    scan = Scan(True)
    assert find_run(many, scan, window=64, reach=8, tries=4) is None
    assert scan.at == 27 and scan.counted == 24 and scan.quotes == 1 + 6  # the 5th's bracket
    assert find_run(":[" * 100, scan := Scan(False), window=64, reach=8, tries=4) is None
    assert scan.at == 2 * 32 + 1  # the 33rd: brackets after anything else, 8 a try
    assert _find("," + " " * 70 + '{"a":1},{"a":2},{"a":3},{"a":4},{}') == (79, '},{"a":', 1)
    # The quotes are counted from the nearest place asked about before.
    scan, text = Scan(False), '"a", "b\\\\", "c\\"'
    assert scan.in_string(text, 4) is False and scan.ends_in_string(text) is True
    assert scan.in_string(text, 5) is False and scan.in_string(text, len(text)) is True
    assert scan.ends_in_string(text[:11]) is False and scan.end == 11
    # An element nested too deep to check, or one the window does not hold.
    assert _find("," + "[" * 3000, window=8000) is None
    assert _find(',{"a":"' + "x" * 100 + '"},', window=16) is None
    # A cut's candidates: none, one at the start, a wrong guess then the right one.
    run = Run(1, "},{", 1)
    assert cut_end('{"a":1}', 0, run, 3) == -1
    assert cut_end('},{"a":1}', 0, run, 3) == -1
    assert cut_end(',{"a":1}', 0, Run(1, ",{", 0), 3) == -1
    assert cut_end('{"a":1},{"b":"x},{y', 0, run, 3) == 7


def test_a_chat_chunk_s_logprobs_are_cut_and_not_read() -> None:
    """Runs inside a `logprobs` member, which accounting never reads, leave the skeleton
    answering: no whole read, the whole path's counts and bytes."""
    content = ",".join(_logprob(n) for n in range(400))
    choice = f'{{"index":0,"delta":{{"content":"hi"}},"logprobs":{{"content":[{content}]}}}}'
    event = f'data: {{"id":"c","model":"m","choices":[{choice}]}}\n\ndata: [DONE]\n\n'.encode()
    reads = _cut(event, list(range(1000, len(event), 1000)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LargeEvent, "whole", None)  # a whole read would fail
        got = _run(reads, UsageChunkFilter(), 2000, run=64)
    want = _run(reads, UsageChunkFilter(), NEVER, run=64)
    assert got[0] == want[0] and got[1] == want[1] and got[2] > 0
