"""`_shaped_run` (proxy/usage/plain_reads.py), the run of blocks of a stream's shape in a read
of several events: split where each trail is, each piece after the first checked to begin
with the lead at once (a join and a compare), one by one only when that check fails. The
agreement with the full parse over generated reads is tests/test_usage_plain.py's; here the
paths of the check, and that the split's separator stays short."""

from __future__ import annotations

import ast
import inspect
import textwrap

from bench.fake_upstream import stream_events
from proxy.usage import plain_reads
from proxy.usage.fast import read_chunk, shape_of

_EVENTS = stream_events(12)  # role, 8 content chunks, finish, usage, [DONE]
_FIELDS = read_chunk(_EVENTS[2][len(b"data: ") : -2])
assert _FIELDS is not None
_SHAPE = shape_of(_EVENTS[2][len(b"data: ") : -2], _FIELDS)
assert _SHAPE is not None
_LEAD, _TRAIL = _SHAPE.lead, _SHAPE.trail
_WORDS = [b"Hello", b"!", b" How", b" can", b" I", b" help", b" you", b" today"]


def _run(read: bytes) -> tuple[list[bytes], list[int]] | None:
    return plain_reads._shaped_run(read, 0, _LEAD, _TRAIL, read.isascii())


def test_a_run_of_blocks_of_the_shape_is_taken_whole() -> None:
    """Eight content blocks, then the finish, usage and [DONE] blocks: the eight texts."""
    assert _run(b"".join(_EVENTS[1:])) == (_WORDS, [len(w) for w in _WORDS])


def test_a_block_of_another_lead_between_ends_the_run_before_it() -> None:
    """A block whose bytes end with the shape's trail but begin otherwise among the run's
    (choice 1's, its lead as long as the shape's: what follows it is its text alone): the
    one-piece-at-a-time check finds it, and the run is the blocks before it, though blocks
    of the shape follow (choice 1's text is not choice 0's)."""
    other = _EVENTS[4].replace(b'"index":0', b'"index":1', 1)
    assert other.endswith(_TRAIL) and not other.startswith(_LEAD)
    assert other[len(_LEAD) : -len(_TRAIL)] == _WORDS[3]
    read = b"".join([*_EVENTS[1:4], other, *_EVENTS[5:9]])
    assert _run(read) == (_WORDS[:3], [len(w) for w in _WORDS[:3]])
    # as the run's first block after its first: a run of one
    read = b"".join([_EVENTS[1], other, *_EVENTS[2:9]])
    assert _run(read) == ([_WORDS[0]], [len(_WORDS[0])])


def test_a_text_the_check_refuses_ends_the_run_before_it() -> None:
    """A quote in the third text (a block no encoder writes): the run is the two before."""
    broken = _EVENTS[3].replace(b'"content":" How"', b'"content":" H"ow"')
    read = b"".join([*_EVENTS[1:3], broken, *_EVENTS[4:9]])
    assert _run(read) == (_WORDS[:2], [len(w) for w in _WORDS[:2]])


def test_no_trail_after_the_first_text_is_no_run() -> None:
    assert _run(_EVENTS[1][:-5]) is None
    assert _run(_LEAD + b'ab"c' + _TRAIL) is None


def test_the_split_is_on_the_trail_alone() -> None:
    """The run's one split is on the trail, not on `trail + lead`: a separator of 100 bytes
    or more in a read over 2,500 makes CPython prepare its two-way search again for each
    piece it finds (~8k instructions a block). A static check of the function's source."""
    assert len(_TRAIL) < 100 <= len(_TRAIL + _LEAD)
    tree = ast.parse(textwrap.dedent(inspect.getsource(plain_reads._shaped_run)))
    splits = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "split"
    ]
    assert splits
    assert all(ast.unparse(node.args[0]) == "trail" for node in splits)
