"""volkin.log: every line is key=value, whether it came from an event or a plain message."""

from __future__ import annotations

import logging

from volkin.log import KeyValueFormatter, event


def _line(emit: object) -> str:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("volkin.test_log")
    keep = Keep()
    logger.addHandler(keep)
    logger.propagate = False
    try:
        assert callable(emit)
        emit(logger)
    finally:
        logger.removeHandler(keep)
    [record] = records
    return KeyValueFormatter().format(record)


def test_an_event_is_its_name_and_its_fields() -> None:
    line = _line(lambda log: event(log, "nbd.failed", logging.WARNING, op="READ",
                                   error="agent a1 is away"))
    assert " level=warning event=nbd.failed op=READ error=\"agent a1 is away\"" in line


def test_a_plain_message_gets_a_field_of_its_own_not_the_event() -> None:
    line = _line(lambda log: log.warning("socket.send() raised exception on %s", "nbd"))
    assert " event=volkin.test_log.message " in line
    assert line.endswith(" message=\"socket.send() raised exception on nbd\"")
