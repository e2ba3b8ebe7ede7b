"""Large request bodies a request ends holding are freed one per loop iteration
(proxy.request_body.release_in_turns): freeing 60 MiB is a ~5-7 ms step of its own."""

from __future__ import annotations

import asyncio
import itertools
import weakref

from proxy.request_body import LARGE_RELEASE_BYTES, release_in_turns


class Body(bytearray):
    """A bytearray that can be watched with a weak reference."""


async def test_large_bodies_are_freed_in_separate_iterations() -> None:
    loop = asyncio.get_running_loop()
    a, b, c = (Body(LARGE_RELEASE_BYTES) for _ in range(3))
    small = Body(10)
    refs = [weakref.ref(x) for x in (a, b, c)]
    small_ref = weakref.ref(small)
    release_in_turns(loop, [a, b, a, small, c])  # `a` twice: held once
    del a, b, c, small
    assert small_ref() is None  # small ones are not held
    alive = [sum(r() is not None for r in refs)]
    for _ in range(100):
        if not alive[-1]:
            break
        await asyncio.sleep(0)
        alive.append(sum(r() is not None for r in refs))
    assert alive[-1] == 0
    # Never two freed between one iteration and the next.
    assert all(before - after <= 1 for before, after in itertools.pairwise(alive))
    assert alive[0] == 3


async def test_one_large_body_is_not_held() -> None:
    body, small = Body(LARGE_RELEASE_BYTES), Body(10)
    ref = weakref.ref(body)
    release_in_turns(asyncio.get_running_loop(), [body, small])
    del body
    assert ref() is None
