"""Append-side helpers shared by event-log implementations that talk to a server.

:func:`check_batch` validates a batch locally before any I/O; :class:`UncertainBatchMemo`
remembers a batch whose append ended with an unknown outcome so that an identical retry can
be recognised by its batch id (the server then returns the positions it already assigned
instead of :class:`~torus_core.errors.CompareFailed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torus_core.errors import CompareFailed, InvalidArgument, MetadataUnavailable
from torus_core.eventlog import NewEvent

#: Bytes of a random batch id.
BATCH_ID_BYTES = 16


def check_batch(events: Sequence[NewEvent]) -> dict[str, tuple[int, int]]:
    """Validate a batch locally; return ``{stream: (first_version, last_version)}`` in batch order.

    Raises :class:`InvalidArgument` for malformed events and :class:`CompareFailed` when a
    stream's versions inside the batch are not consecutive (or its first one is below 1).
    """
    streams: dict[str, tuple[int, int]] = {}
    for ev in events:
        if not isinstance(ev, NewEvent):
            raise InvalidArgument(f"append takes NewEvent objects, got {type(ev).__name__}")
        if not isinstance(ev.stream_id, str) or not ev.stream_id:
            raise InvalidArgument("stream_id must be a non-empty string")
        if not isinstance(ev.topic, str):
            raise InvalidArgument("topic must be a string")
        if not isinstance(ev.state, bytes | bytearray | memoryview):
            raise InvalidArgument("state must be bytes")
        if not isinstance(ev.version, int) or isinstance(ev.version, bool):
            raise InvalidArgument("version must be an int")
        seen = streams.get(ev.stream_id)
        if seen is None:
            if ev.version < 1:
                raise CompareFailed(
                    f"stream {ev.stream_id!r}: version {ev.version} < 1",
                    stream_id=ev.stream_id,
                    version=ev.version,
                )
            streams[ev.stream_id] = (ev.version, ev.version)
        else:
            if ev.version != seen[1] + 1:
                raise CompareFailed(
                    f"stream {ev.stream_id!r}: version {ev.version} does not follow {seen[1]} in the batch",
                    stream_id=ev.stream_id,
                    version=ev.version,
                )
            streams[ev.stream_id] = (seen[0], ev.version)
    return streams


class UncertainBatchMemo:
    """The last batch whose append raised :class:`MetadataUnavailable` (outcome unknown).

    :meth:`append` gives every attempt a batch id: a fresh random one, or, when the events are
    identical to the remembered batch, that batch's id with ``retry=True``. Not thread-safe on
    its own; one memo per event-log object, as the original per-log attribute was.
    """

    def __init__(self) -> None:
        self._uncertain: tuple[tuple[NewEvent, ...], bytes] | None = None

    def append(self, events: tuple[NewEvent, ...], attempt: Callable[[bytes, bool], list[int]]) -> list[int]:
        """Run ``attempt(batch_id, retry)``; remember ``events`` if it raises MetadataUnavailable."""
        uncertain = self._uncertain
        retry = uncertain is not None and uncertain[0] == events
        batch_id = uncertain[1] if retry and uncertain is not None else os.urandom(BATCH_ID_BYTES)
        try:
            positions = attempt(batch_id, retry)
        except MetadataUnavailable:
            self._uncertain = (events, batch_id)
            raise
        if retry:
            self._uncertain = None
        return positions
