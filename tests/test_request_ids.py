"""New request ids (proxy/request_ids.py): 32 hex digits of 128 random bits, never repeated,
drawn from the OS a batch at a time; a forked child never reuses its parent's batch."""

from __future__ import annotations

import os
import re

import pytest

from proxy import request_ids
from proxy.request_ids import BATCH, new_request_id
from tests.support import in_forked_child

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_never_repeat_across_draws() -> None:
    ids = [new_request_id() for _ in range(5 * BATCH + 7)]  # several batches, and a part
    assert all(HEX32.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_ids_come_from_the_os_random_source(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []

    def urandom(size: int) -> bytes:
        drawn.append(size)
        return bytes(range(256)) * (size // 256)

    monkeypatch.setattr(request_ids, "_ready", [])
    monkeypatch.setattr(os, "urandom", urandom)
    first = new_request_id()
    assert drawn == [16 * BATCH]  # one draw for a batch
    assert [new_request_id() for _ in range(BATCH - 1)][-1] == bytes(range(16)).hex()
    assert first == bytes(range(240, 256)).hex()
    assert drawn == [16 * BATCH]
    new_request_id()
    assert drawn == [16 * BATCH, 16 * BATCH]  # the next batch is a new draw


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    new_request_id()  # the parent holds the rest of a batch
    sent = in_forked_child(lambda: "".join(new_request_id() for _ in range(BATCH)))
    child = {sent[at : at + 32] for at in range(0, len(sent), 32)}
    parent = {new_request_id() for _ in range(BATCH)}
    assert len(child) == BATCH and len(parent) == BATCH
    assert not child & parent
