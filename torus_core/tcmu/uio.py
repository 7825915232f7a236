"""The uio side of a TCMU device: find ``/dev/uioN``, mmap its map 0, wait and notify.

The kernel raises a uio "interrupt" when it queued commands: the event counter a ``read`` of
4 bytes returns changes, and ``poll`` reports the fd readable. The handler tells the kernel it
completed entries by writing 4 bytes to the fd. :class:`TcmuHandler` runs the loop (process
the ring, notify, wait with a timeout) on one thread until stopped.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
import select
import threading
import time

from torus_core.errors import NotExist, TorusError
from torus_core.tcmu.ring import CommandRing, Commit, Executor

log = logging.getLogger(__name__)

SYS_UIO = "/sys/class/uio"
#: seconds one wait lasts before the handler re-checks the ring and its stop flag
WAIT_SLICE = 0.5


def find_uio(name: str, *, sys_uio: str = SYS_UIO, timeout: float = 10.0) -> str:
    """The ``uioN`` whose sysfs ``name`` is ``name`` (TCMU: ``tcm-user/HBA/DEV/CONFIG``).

    Waits up to ``timeout`` seconds for it to appear; NotExist after that."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in sorted(glob.glob(os.path.join(sys_uio, "uio*"))):
            try:
                with open(os.path.join(entry, "name")) as f:
                    if f.read().strip() == name:
                        return os.path.basename(entry)
            except OSError:
                continue
        if time.monotonic() >= deadline:
            raise NotExist(f"no uio device named {name!r} under {sys_uio} after {timeout:.0f}s")
        time.sleep(0.05)


class UioDevice:
    """An opened ``/dev/uioN`` with its map 0 mapped read-write."""

    def __init__(self, uio: str, *, dev_dir: str = "/dev", sys_uio: str = SYS_UIO) -> None:
        self.name = uio
        try:
            with open(os.path.join(sys_uio, uio, "maps", "map0", "size")) as f:
                self.size = int(f.read().strip(), 0)
            self.fd = os.open(os.path.join(dev_dir, uio), os.O_RDWR | os.O_CLOEXEC)
        except (OSError, ValueError) as exc:
            raise TorusError(f"cannot open TCMU uio device {uio}: {exc}") from exc
        try:
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise TorusError(f"cannot mmap {uio} ({self.size} bytes): {exc}") from exc
        self.view = memoryview(self.map)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the kernel's next notification; True if one came."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        os.read(self.fd, 4)
        return True

    def notify(self) -> None:
        """Tell the kernel that completed entries wait in the ring."""
        os.write(self.fd, b"\0\0\0\0")

    def close(self) -> None:
        """Unmap and close (the views handed out must be released first)."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:  # a view is still referenced: the mapping goes with the last one
            log.debug("%s: map still referenced at close", self.name)
        os.close(self.fd)


class TcmuHandler:
    """Serves one TCMU device: one thread completes the ring's commands in order.

    With ``commit`` (a write-through disk), each pass over the ring commits before it completes
    anything: see :meth:`~torus_core.tcmu.ring.CommandRing.process`."""

    def __init__(self, uio: UioDevice, execute: Executor, commit: Commit | None = None) -> None:
        self.uio = uio
        self.ring = CommandRing(uio.view)
        self.execute = execute
        self.commit = commit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the exception that ended the loop, if any
        self.error: BaseException | None = None

    def start(self) -> TcmuHandler:
        """Start the serving thread."""
        self._thread = threading.Thread(target=self._run, name=f"tcmu-{self.uio.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.ring.process(self.execute, commit=self.commit):
                    self.uio.notify()
                if not self.ring.pending():
                    self.uio.wait(WAIT_SLICE)
        except BaseException as exc:  # reported by stop() and logged now
            self.error = exc
            log.exception("TCMU handler for %s stopped", self.uio.name)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (it finishes the command it is running) and close the device."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TorusError(f"TCMU handler for {self.uio.name} did not stop within {timeout:.0f}s")
        self.uio.close()
