"""A peer's data directory: the files that give it a stable identity, and their permissions.

Below both :mod:`torus_core.block` (the data-dir claim of a single node) and
:mod:`torus_core.cluster` (a storage peer's UUID), which must not import each other.

Permissions
    Everything torus keeps in a data directory (block store, journal segments, the SQLite
    metadata database, the identity files) holds volume data or can name it, so it is private to
    the user running the server, as etcd's data directory is: directories ``0700``
    (:data:`PRIVATE_DIR_MODE`), files ``0600`` (:data:`PRIVATE_FILE_MODE`), whatever the umask.
    :func:`private_dir` and :func:`open_private` create them so, and tighten (with a warning)
    an existing directory or file that other users could read, e.g. one written by an older
    torus with ``0755``/``0644``.

Cluster binding
    ``<data_dir>/metadata/cluster`` names the cluster (its ``cluster_id``, set when it was
    formatted) whose blocks and journals the directory holds. :func:`bind_cluster` writes it on
    the first start and refuses, with :class:`~torus_core.errors.ForeignDataDir`, a server of
    another cluster: its garbage collector would otherwise delete the first cluster's blocks.
    ``torusctl wipe`` drops the binding of its own ``--data-dir`` (:func:`unbind_cluster`), so
    a directory can be reused after its cluster's metadata was wiped and formatted again.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid as uuidlib

from torus_core.errors import ConfigError, ForeignDataDir

__all__ = [
    "CLUSTER_FILE",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "bind_cluster",
    "load_or_create_uuid",
    "open_private",
    "private_dir",
    "restrict_file",
    "unbind_cluster",
]

log = logging.getLogger(__name__)

#: Mode of every directory torus creates in a data directory (owner only).
PRIVATE_DIR_MODE = 0o700
#: Mode of every file torus creates in a data directory (owner read/write only).
PRIVATE_FILE_MODE = 0o600
#: File under ``<data_dir>/metadata`` naming the cluster the data directory belongs to.
CLUSTER_FILE = "cluster"

_warned: set[str] = set()


def _tighten(path: str, st: os.stat_result, mode: int, fd: int | None = None, *, fix: bool = True) -> None:
    current = stat.S_IMODE(st.st_mode)
    if current & 0o077 == 0:
        return  # already private (possibly stricter than ``mode``): leave it
    if not fix:
        key = os.path.realpath(path)
        if key in _warned:
            return  # once per directory and process (the data dir is checked by several openers)
        _warned.add(key)
        log.warning(
            "%s has mode %04o: other users can look into it; torus recommends %04o",
            path,
            current,
            mode,
        )
        return
    try:
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(path, mode)
    except OSError as exc:
        log.warning(
            "%s has mode %04o (other users can read it) and cannot be restricted to %04o: %s",
            path,
            current,
            mode,
            exc,
        )
        return
    log.warning("%s had mode %04o, readable by other users: restricted it to %04o", path, current, mode)


def private_dir(path: str | os.PathLike[str], *, fix_existing: bool = True) -> None:
    """Create directory ``path`` (and missing parents) with mode ``0700``, whatever the umask.

    An existing ``path`` that group or others can access is restricted to ``0700`` (logged), or
    with ``fix_existing=False`` (a directory the user chose, e.g. the data directory itself,
    which torus does not own) only warned about. Existing parents are left alone.

    :raises OSError: as :func:`os.mkdir` does.
    """
    path = os.fspath(path)
    missing: list[str] = []
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by another thread or process: checked below
        os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    _tighten(path, os.stat(path), PRIVATE_DIR_MODE, fix=fix_existing or bool(missing))


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open(path, flags)`` for a data-dir file: created ``0600``, an existing one tightened.

    ``O_CLOEXEC`` is always added. :raises OSError: as :func:`os.open` does.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        _tighten(os.fspath(path), os.fstat(fd), PRIVATE_FILE_MODE, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict_file(path: str | os.PathLike[str]) -> None:
    """Restrict an existing file to ``0600`` (logged) if others can read it; absent: nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    _tighten(os.fspath(path), st, PRIVATE_FILE_MODE)


def _write_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp"
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_file(path: str, what: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
    restrict_file(path)
    return value or None


def load_or_create_uuid(data_dir: str) -> str:
    """This peer's UUID from ``<data_dir>/metadata/uuid``, created on first start."""
    path = os.path.join(data_dir, "metadata", "uuid")
    value = _read_file(path, "peer uuid")
    if value:
        return value
    value = str(uuidlib.uuid4())
    private_dir(os.path.dirname(path))
    _write_file(path, value + "\n")
    return value


def bind_cluster(data_dir: str, cluster_id: str) -> None:
    """Bind ``data_dir`` to the cluster ``cluster_id``, or refuse a directory of another cluster.

    The first start records ``cluster_id`` in ``<data_dir>/metadata/cluster``; later starts must
    name the same cluster. A cluster formatted before cluster ids existed (``cluster_id`` empty)
    binds nothing, but cannot use a directory bound to a cluster.

    :raises ForeignDataDir: the directory belongs to another cluster (its id is in the message).
    :raises ConfigError: the binding file cannot be read or written.
    """
    path = os.path.join(data_dir, "metadata", CLUSTER_FILE)
    bound = _read_file(path, "cluster binding")
    if bound is not None:
        if bound != cluster_id:
            raise ForeignDataDir(
                f"data directory {data_dir} belongs to cluster {bound}, not to this cluster "
                f"({cluster_id or 'formatted without a cluster id'}): use another --data-dir, "
                f"or delete the directory's contents if that cluster's data is no longer needed",
                bound_cluster=bound,
                cluster_id=cluster_id,
            )
        return
    if not cluster_id:
        return
    try:
        private_dir(os.path.dirname(path))
        _write_file(path, cluster_id + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot record the data directory's cluster in {path}: {exc}") from exc
    log.info("data directory %s bound to cluster %s", data_dir, cluster_id)


def unbind_cluster(data_dir: str, cluster_id: str) -> bool:
    """Drop ``data_dir``'s binding if it names ``cluster_id`` (whose metadata is being wiped).

    Returns whether a binding was removed; a directory bound to another cluster is left alone.
    """
    path = os.path.join(data_dir, "metadata", CLUSTER_FILE)
    if not cluster_id or _read_file(path, "cluster binding") != cluster_id:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove the data directory's cluster binding {path}: {exc}") from exc
    return True
