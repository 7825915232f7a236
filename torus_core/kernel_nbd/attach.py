"""Attach an NBD :class:`~torus_core.nbd.export.Export` as a local ``/dev/nbdN``.

:class:`KernelAttachment` serves the kernel's NBD client over ``AF_UNIX`` socketpairs in this
process, with the same transmission code as the network server (:mod:`torus_core.nbd`): the
kernel speaks the transmission phase directly (no handshake), so each connection gets a
:class:`~torus_core.nbd.session.Session` built from the export's own description.

Attach: generic netlink NBD_CMD_CONNECT (several connections, ``CAN_MULTI_CONN``, a
dead-connection timeout, the backend identifier ``torus:VOLUME``); on kernels without the
``nbd`` family, the ioctls (NBD_SET_SOCK ... NBD_DO_IT in a thread). Detach
(:meth:`KernelAttachment.stop`): flush, disconnect (the kernel sends NBD_CMD_DISC on each
connection), wait for the connections to end -- each closes its export, the last one syncs and
unlocks the volume -- then stop the loop. The attachment also ends by itself when the kernel
disconnects (``torusblk nbd -d``, another ``nbd-client -d``); :attr:`finished` is set then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from torus_core.errors import InvalidArgument, TorusError
from torus_core.kernel_nbd import ioctl, netlink
from torus_core.kernel_nbd.netlink import KernelNBDError, NBDNetlink, NoNetlink
from torus_core.nbd.constants import TransmissionFlag
from torus_core.nbd.export import Export
from torus_core.nbd.session import ServerOptions, Session, transmission_flags
from torus_core.nbd.stream import TRANSPORT_HIGH, BufferedStream, ConnectionClosed
from torus_core.nbd.transmission import Transmission
from torus_core.nbd.workers import WorkerPool

log = logging.getLogger(__name__)

#: Seconds the kernel waits for one request before it gives up on a connection.
DEFAULT_TIMEOUT = 120
#: Seconds the kernel holds I/O for a replacement connection after all died (longer than a
#: lock takeover, which is at most a lease TTL: a restarted server can reconfigure meanwhile).
DEFAULT_DEAD_CONN_TIMEOUT = 60
DEFAULT_CONNECTIONS = 2
#: Seconds :meth:`KernelAttachment.stop` waits for the connections to end after disconnecting.
STOP_WAIT = 60.0
INTERFACES = ("auto", "netlink", "ioctl")


class KernelAttachment:
    """One export served to the kernel as ``/dev/nbdN`` (see the module docstring).

    :param open_export: opens one more handle on the export (called once per connection; all
        handles must share the underlying data so a FLUSH on one covers all, as
        :class:`~torus_core.block.nbd_export.VolumeExportProvider` does).
    :param device: ``/dev/nbdN`` to use, or None for a free one.
    :param interface: ``auto`` (netlink, else ioctls), ``netlink`` or ``ioctl``.
    """

    def __init__(
        self,
        open_export: Callable[[], Export],
        *,
        device: str | None = None,
        connections: int = DEFAULT_CONNECTIONS,
        timeout: int = DEFAULT_TIMEOUT,
        dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
        interface: str = "auto",
        identifier: str = "",
        workers: int = 8,
        notify: threading.Event | None = None,
    ) -> None:
        if not 1 <= connections <= 16:
            raise InvalidArgument(f"connections must be 1..16, not {connections}")
        if interface not in INTERFACES:
            raise InvalidArgument(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
        if timeout < 0 or dead_conn_timeout < 0:
            raise InvalidArgument("timeouts must not be negative")
        self.index = ioctl.device_index(device) if device is not None else None
        self._open_export = open_export
        self.connections = connections
        self.timeout = timeout
        self.dead_conn_timeout = dead_conn_timeout
        self.interface = interface
        self.identifier = identifier
        #: which interface attached the device (``netlink`` or ``ioctl``), once started
        self.used: str | None = None
        #: set once every connection ended (detached, or the kernel disconnected)
        self.finished = threading.Event()
        #: also set when every connection ended (e.g. the CLI's wake-up event)
        self._notify = notify
        self.options = ServerOptions()
        self._workers = WorkerPool(workers, name="knbd-io")
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="knbd-ctl")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._exports: list[Export] = []
        #: the first connection's export: flushed before a detach
        self._primary: Export | None = None
        self._streams: list[BufferedStream] = []
        self._ioctl_dev: ioctl.IoctlDevice | None = None
        self._do_it: threading.Thread | None = None
        self._stopped = False

    @property
    def device(self) -> str:
        """``/dev/nbdN`` (after :meth:`start`)."""
        if self.index is None:
            raise InvalidArgument("not attached yet")
        return ioctl.device_path(self.index)

    # --- attach ------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the export, attach it, serve it; returns the device path.

        Errors of the export (e.g. :class:`~torus_core.errors.Locked`) and of the kernel
        (:class:`~torus_core.kernel_nbd.netlink.KernelNBDError`) are raised with nothing left
        attached or open.
        """
        try:
            for _ in range(self.connections):
                self._exports.append(self._open_export())
            export = self._primary = self._exports[0]
            info = export.info()
            flags = transmission_flags(info, structured=False)
            if self.connections > 1 and not flags & TransmissionFlag.CAN_MULTI_CONN:
                raise InvalidArgument(f"export {export.name!r} cannot be served over several connections")
            block_size = 4096 if export.size % 4096 == 0 else 512
            if export.size < block_size or export.size % 512:
                raise InvalidArgument(f"export size {export.size} is not a multiple of 512 bytes")
            pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in self._exports]
            self._thread = threading.Thread(target=self._loop.run_forever, name="knbd-loop", daemon=True)
            self._thread.start()
            served = [
                asyncio.run_coroutine_threadsafe(self._serve(ours, exp, flags), self._loop).result(10)
                for (ours, _), exp in zip(pairs, self._exports, strict=True)
            ]
            self._exports = []  # each transmission now owns (and closes) its export
            asyncio.run_coroutine_threadsafe(self._watch(served), self._loop)
            kernel_fds = [theirs.fileno() for _, theirs in pairs]
            try:
                self._attach(kernel_fds, export.size, block_size, flags, export.name)
            finally:
                for _, theirs in pairs:
                    theirs.close()  # the kernel holds its own reference now
        except BaseException:
            self._abort()
            raise
        log.info(
            "attached %s as %s over %s (%d connections)", export.name, self.device, self.used, len(pairs)
        )
        return self.device

    def _attach(self, fds: list[int], size: int, block_size: int, flags: int, name: str) -> None:
        if self.interface != "ioctl":
            try:
                with NBDNetlink() as nl:
                    attrs = netlink.connect_attrs(
                        fds,
                        size,
                        block_size,
                        flags,
                        index=self.index,
                        timeout=self.timeout,
                        dead_conn_timeout=self.dead_conn_timeout,
                        identifier=self.identifier or f"torus:{name}",
                    )
                    try:
                        self.index = nl.connect(attrs)
                    except KernelNBDError as exc:
                        raise self._connect_error(exc) from exc
                self.used = "netlink"
                return
            except NoNetlink:
                if self.interface == "netlink":
                    raise
                log.info("no nbd netlink family; attaching with the ioctls")
        if self.index is None:
            self.index = ioctl.free_device()
        dev = ioctl.IoctlDevice(self.index)
        try:
            dev.configure(fds, size, block_size, flags, self.timeout)
        except KernelNBDError as exc:
            dev.close()
            raise self._connect_error(exc) from exc
        self._ioctl_dev = dev
        self._do_it = threading.Thread(target=self._run_do_it, name="knbd-do-it", daemon=True)
        self._do_it.start()
        self.used = "ioctl"

    def _connect_error(self, exc: KernelNBDError) -> KernelNBDError:
        where = self.device if self.index is not None else "an NBD device"
        if exc.errno == errno.EBUSY:
            return KernelNBDError(
                f"{where} is already connected (torusblk nbd -d {where} frees it)", exc.errno
            )
        return KernelNBDError(f"the kernel refused to connect {where}: {exc}", exc.errno)

    def _run_do_it(self) -> None:
        dev = self._ioctl_dev
        assert dev is not None
        try:
            dev.do_it()
        except TorusError as exc:
            log.error("%s: %s", self.device, exc)
        finally:
            dev.clear()

    # --- serving -------------------------------------------------------------------------------

    async def _serve(self, sock: socket.socket, export: Export, flags: int) -> asyncio.Task[None]:
        """Wrap ``sock`` in a stream and start its transmission; returns the running task."""
        loop = asyncio.get_running_loop()
        _, stream = await loop.connect_accepted_socket(BufferedStream, sock)
        assert stream.transport is not None
        stream.transport.set_write_buffer_limits(high=TRANSPORT_HIGH)
        self._streams.append(stream)
        session = Session(
            export=export,
            flags=flags,
            structured=False,
            allocation_context=None,
            max_block_size=min(export.max_block_size, self.options.max_payload),
        )
        transmission = Transmission(stream, session, self.options, self._executor, self._workers)
        return loop.create_task(self._transmit(stream, transmission))

    async def _transmit(self, stream: BufferedStream, transmission: Transmission) -> None:
        try:
            await transmission.run()
        except (ConnectionClosed, ConnectionError) as exc:
            log.debug("kernel NBD connection ended: %r", exc)
        except TorusError as exc:
            log.warning("kernel NBD connection failed: %s", exc)
        except Exception:
            log.exception("kernel NBD connection failed")
        finally:
            stream.close()

    async def _watch(self, tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self._stopped:
            log.info("%s was disconnected by the kernel", self.device if self.index is not None else "device")
        self.finished.set()
        if self._notify is not None:
            self._notify.set()

    # --- detach --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every write the kernel sent so far durable (before a detach)."""
        if self._primary is not None:
            self._primary.flush()

    def stop(self, wait: float = STOP_WAIT) -> None:
        """Flush, disconnect the device, wait (bounded) for the connections to close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if not self.finished.is_set():
                with contextlib.suppress(TorusError):
                    self.flush()
                self._disconnect()
                if not self.finished.wait(wait):
                    log.warning("%s: connections still open %.0f s after the disconnect", self.device, wait)
        finally:
            self._abort()

    def _disconnect(self) -> None:
        if self.index is None:
            return
        try:
            if self.used == "netlink":
                with NBDNetlink() as nl:
                    nl.disconnect(self.index)
            elif self._ioctl_dev is not None:
                self._ioctl_dev.disconnect()
        except TorusError as exc:
            log.error("disconnecting %s: %s", self.device, exc)

    def _abort(self) -> None:
        """Close what is still open: streams (their transmissions close their exports), exports
        not yet handed to a transmission, the loop thread, the ioctl device."""
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            for stream in list(self._streams):
                self._loop.call_soon_threadsafe(stream.close)
            if not self.finished.wait(10.0 if self._streams else 0):
                log.warning("kernel NBD connections did not end")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._finish_loop()
        for export in self._exports:
            with contextlib.suppress(TorusError):
                export.close()
        self._exports = []
        if self._do_it is not None:
            self._do_it.join(10)
        if self._ioctl_dev is not None:
            self._ioctl_dev.close()
            self._ioctl_dev = None
        self._executor.shutdown(wait=False)
        self._workers.shutdown()

    def _finish_loop(self) -> None:
        """Cancel what is left on the (stopped) loop, let it unwind (bounded), close the loop."""
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        if tasks:
            gathered = asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                self._loop.run_until_complete(asyncio.wait_for(gathered, 5.0))
        self._loop.close()


def detach(device: str) -> str:
    """Disconnect ``/dev/nbdN`` (netlink, else the ioctls); returns how. For ``torusblk nbd -d``."""
    index = ioctl.device_index(device)
    try:
        with NBDNetlink() as nl:
            nl.disconnect(index)
        return "netlink"
    except NoNetlink:
        ioctl.disconnect(index)
        return "ioctl"
