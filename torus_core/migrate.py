"""Copy a cluster's metadata event log from one backend to another (``torusctl migrate``).

The log is the truth, so a migration is a replay: every event is appended to the empty target
in source order, in batches, with the same stream id, version, topic and state. Because the
target is empty and positions are gap-free, each target position equals the source position;
:func:`migrate` checks that on every batch. Then it verifies: same head, the same events
(read back from both sides), and an optional caller-supplied check (the CLI passes
:func:`compare_projections`, which folds both logs into cluster states and compares them).

Not copied, on purpose:

* leases and lease-store keys — ephemeral; live daemons re-create them;
* projection snapshots — caches; the target rebuilds them on first load;
* append timestamps — :class:`~torus_core.eventlog.NewEvent` carries none, so target events get
  the migration's wall-clock time.

Run it with the cluster stopped (no writers on the source): events appended to the source
during the copy are copied if they arrive before the final read, otherwise verification fails
with a head mismatch and nothing is lost on the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torus_core.errors import AlreadyExists, InvalidArgument, MetadataError
from torus_core.eventlog import MetadataBackend, NewEvent, StoredEvent

#: Events per append. etcd's default ``--max-txn-ops`` (128) allows 63 events per transaction.
DEFAULT_BATCH_SIZE = 50
#: Events per read page during copy and verification.
READ_PAGE = 500

#: A verification hook: raise :class:`MigrationError` if ``target`` does not match ``source``.
Verifier = Callable[[MetadataBackend, MetadataBackend], None]


class MigrationError(MetadataError):
    """The target does not hold exactly the source's events after a migration."""


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migrate` did."""

    events: int
    head: int
    batches: int


def _key(e: StoredEvent) -> tuple[int, str, int, str, bytes]:
    return (e.position, e.stream_id, e.version, e.topic, e.state)


def _check_target_empty(target: MetadataBackend) -> None:
    head = target.log.head_position()
    if head != 0:
        raise AlreadyExists(
            f"migration target already holds {head} events; it must be empty (wipe it deliberately first)"
        )


def migrate(
    source: MetadataBackend,
    target: MetadataBackend,
    verify: Verifier | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Copy ``source``'s event log into the empty ``target`` and verify the copy.

    :param verify: extra check run after the event comparison (e.g. :func:`compare_projections`).
    :param batch_size: events per target append (each append is atomic).
    :param progress: called as ``progress(copied, source_head)`` after every batch.
    :raises AlreadyExists: the target is not empty (nothing is written).
    :raises MigrationError: a target position differs from the source's, or verification failed.
    """
    if batch_size < 1:
        raise InvalidArgument("batch_size must be >= 1")
    _check_target_empty(target)
    source_head = source.log.head_position()
    copied = 0
    batches = 0
    after = 0
    while True:
        page = source.log.read_all(after=after, limit=READ_PAGE)
        if not page:
            break
        for i in range(0, len(page), batch_size):
            chunk = page[i : i + batch_size]
            expected = [e.position for e in chunk]
            if expected != list(range(copied + 1, copied + 1 + len(chunk))):
                raise MigrationError(f"source positions are not gap-free near {expected[0]}; aborting")
            got = target.log.append([NewEvent(e.stream_id, e.version, e.topic, e.state) for e in chunk])
            if got != expected:
                raise MigrationError(
                    f"target assigned positions {got[0]}..{got[-1]} to source positions "
                    f"{expected[0]}..{expected[-1]}; is something else writing to the target?"
                )
            copied += len(chunk)
            batches += 1
            if progress is not None:
                progress(copied, max(source_head, copied))
        after = page[-1].position
    verify_copy(source, target)
    if verify is not None:
        verify(source, target)
    return MigrationReport(events=copied, head=copied, batches=batches)


def verify_copy(source: MetadataBackend, target: MetadataBackend) -> None:
    """Raise :class:`MigrationError` unless both logs have the same head and the same events."""
    s_head, t_head = source.log.head_position(), target.log.head_position()
    if s_head != t_head:
        raise MigrationError(f"head differs after migration: source {s_head}, target {t_head}")
    after = 0
    while True:
        s_page = source.log.read_all(after=after, limit=READ_PAGE)
        t_page = target.log.read_all(after=after, limit=READ_PAGE)
        if [_key(e) for e in s_page] != [_key(e) for e in t_page]:
            for s, t in zip(s_page, t_page, strict=False):
                if _key(s) != _key(t):
                    raise MigrationError(
                        f"event at position {s.position} differs: source {s!r}, target {t!r}"
                    )
            raise MigrationError(f"event count differs after position {after}")
        if not s_page:
            return
        after = s_page[-1].position


def compare_projections(source: MetadataBackend, target: MetadataBackend) -> None:
    """Verifier: fold both logs into cluster states (no snapshots) and require them equal."""
    from torus_core.projection import Projector

    s_state = Projector(source.log, snapshot_every=0).catch_up()
    t_state = Projector(target.log, snapshot_every=0).catch_up()
    if s_state != t_state:
        raise MigrationError("projected cluster state differs between source and target")
