"""`logs._sole_writer` checks the app's chain of loggers in one expression, and gives the walk's
answer for that chain and for every change to it (a handler, a filter, `propagate` off, a
second handler at the root, a filter other than the scrubber, a level above the line's)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import pytest

from proxy import logs
from proxy.logs import _sole_writer, _walked_writer, access_log, configure_logging
from proxy.secrets import LogScrubber, Secrets

HANGUP = logging.getLogger("hangup")  # the app's modules log to it: the access logger's parent
ROOT = logging.getLogger()


@pytest.fixture
def chain() -> Iterator[Callable[[], logging.Handler]]:
    """Makes the chain `configure_logging` makes (in the test itself: pytest adds its capture
    handlers to the root for each phase), and restores the loggers afterwards."""
    saved = {
        logger: (logger.handlers[:], logger.filters[:], logger.propagate, logger.level)
        for logger in (access_log, HANGUP, ROOT)
    }
    writers: list[logging.Handler] = []

    def configure() -> logging.Handler:
        configure_logging(stream=io.StringIO())
        writers.append(ROOT.handlers[0])
        return writers[-1]

    try:
        yield configure
    finally:
        for writer in writers:
            writer.close()
        for logger, (handlers, filters, propagate, level) in saved.items():
            logger.handlers[:], logger.filters[:] = handlers, filters
            logger.propagate = propagate
            logger.setLevel(level)


def _no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    def walked(level: int) -> None:
        raise AssertionError("walked")

    monkeypatch.setattr(logs, "_walked_writer", walked)


def test_the_apps_chain_is_not_walked(
    chain: Callable[[], logging.Handler], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = chain()
    assert HANGUP is access_log.parent
    assert _walked_writer(logging.INFO) == (writer, [])
    _no_walk(monkeypatch)
    assert _sole_writer(logging.INFO) == (writer, ())
    scrubber = LogScrubber(Secrets(["secret-value-1"]))
    writer.addFilter(scrubber)
    assert _sole_writer(logging.ERROR) == (writer, (scrubber,))


def _two_scrubbers(writer: logging.Handler) -> None:
    for _ in range(2):
        writer.addFilter(LogScrubber(Secrets(["secret-value-1"])))


def _changes(writer: logging.Handler) -> list[tuple[str, Callable[[], object]]]:
    other = logging.StreamHandler(io.StringIO())
    return [
        ("a handler on the access logger", lambda: access_log.addHandler(other)),
        ("a filter on the access logger", lambda: access_log.addFilter(logging.Filter("x"))),
        ("the access logger not propagating", lambda: setattr(access_log, "propagate", False)),
        ("a handler on its parent", lambda: HANGUP.addHandler(other)),
        ("a filter on its parent", lambda: HANGUP.addFilter(logging.Filter("x"))),
        ("its parent not propagating", lambda: setattr(HANGUP, "propagate", False)),
        ("a filter on the root", lambda: ROOT.addFilter(logging.Filter("x"))),
        ("a second handler at the root", lambda: ROOT.addHandler(other)),
        ("another handler at the root", lambda: setattr(ROOT, "handlers", [other])),
        ("no handler at the root", lambda: setattr(ROOT, "handlers", [])),
        ("a filter on the writer", lambda: writer.addFilter(logging.Filter("x"))),
        ("two scrubbers on the writer", lambda: _two_scrubbers(writer)),
        ("the writer above the line's level", lambda: writer.setLevel(logging.ERROR)),
        ("the access logger above it", lambda: access_log.setLevel(logging.ERROR)),
    ]


@pytest.mark.parametrize("index", range(14))
def test_every_change_to_the_chain_gets_the_walks_answer(
    chain: Callable[[], logging.Handler], index: int
) -> None:
    writer = chain()
    assert _sole_writer(logging.INFO) == (writer, ())
    name, change = _changes(writer)[index]
    change()
    for level in (logging.INFO, logging.ERROR):
        walked = _walked_writer(level) if access_log.isEnabledFor(level) else None
        found = _sole_writer(level)
        assert (found and (found[0], list(found[1]))) == walked, name
    assert len(_changes(writer)) == 14
