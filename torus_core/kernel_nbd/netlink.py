"""The kernel NBD client's generic-netlink interface (``linux/nbd-netlink.h``), in ``struct``.

Only what ``torusblk nbd`` needs: resolve the ``nbd`` family, and send NBD_CMD_CONNECT (socket
fds, size, block size, server flags, timeouts, backend identifier; the reply names the device
index the kernel picked), NBD_CMD_DISCONNECT and NBD_CMD_RECONFIGURE. pyroute2 has no NBD
family, and this is ~150 lines of the netlink wire format.

A kernel without the ``nbd`` family (no module, or older than 4.12) raises
:class:`NoNetlink` so callers can fall back to the ioctls; every other kernel refusal is a
:class:`KernelNBDError` carrying the errno.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import struct
from collections.abc import Iterator, Sequence

from torus_core.errors import NotSupported, TorusError

NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

NBD_FAMILY = "nbd"
NBD_GENL_VERSION = 1
# commands
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
# attributes
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_BACKEND_IDENTIFIER = 10
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
#: client flags
NBD_CFLAG_DESTROY_ON_DISCONNECT = 0x1
NBD_CFLAG_DISCONNECT_ON_CLOSE = 0x2

_NLMSGHDR = struct.Struct("=IHHII")
_GENLHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
#: Seconds to wait for the kernel's answer to one request.
REPLY_TIMEOUT = 30.0


class KernelNBDError(TorusError):
    """The kernel refused an NBD request (``errno`` is set) or the device is unusable."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class NoNetlink(NotSupported):
    """The running kernel has no ``nbd`` generic-netlink family (use the ioctls)."""


def _pad(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type-length-value, padded to 4 bytes)."""
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_pad(len(raw)) - len(raw))


def u32(kind: int, value: int) -> bytes:
    """A u32 attribute."""
    return attr(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> bytes:
    """A u64 attribute."""
    return attr(kind, struct.pack("=Q", value))


def string(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attr(kind, value.encode() + b"\0")


def nested(kind: int, *children: bytes) -> bytes:
    """A nested attribute holding ``children``."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def parse_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute in ``data``."""
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            break
        yield kind & ~NLA_F_NESTED & 0x7FFF, data[pos + _NLATTR.size : pos + length]
        pos += _pad(length)


class GenlSocket:
    """A blocking generic-netlink socket with request/ack and timeouts."""

    def __init__(self, timeout: float = REPLY_TIMEOUT) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        except OSError as exc:
            raise NoNetlink(f"no generic netlink socket: {exc.strerror}") from exc
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, family: int, cmd: int, version: int, attrs: bytes) -> list[bytes]:
        """Send one request with NLM_F_ACK; return the attribute payloads of its replies.

        Raises :class:`KernelNBDError` with the errno of a negative acknowledgement.
        """
        self._seq += 1
        seq = self._seq
        body = _GENLHDR.pack(cmd, version, 0) + attrs
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
        self.sock.send(msg)
        replies: list[bytes] = []
        for _ in range(64):
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise KernelNBDError("the kernel did not answer a netlink request in time") from exc
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, _flags, rseq, _pid = _NLMSGHDR.unpack_from(data, pos)
                payload = data[pos + _NLMSGHDR.size : pos + length]
                pos += _pad(length)
                if rseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload, 0)
                    if err == 0:
                        return replies
                    code = -err
                    raise KernelNBDError(f"netlink: {os.strerror(code)}", code)
                if kind == NLMSG_DONE:
                    return replies
                replies.append(payload[_GENLHDR.size :])
        raise KernelNBDError("no acknowledgement to a netlink request")

    def family_id(self, name: str) -> int:
        """The id of generic-netlink family ``name``; :class:`NoNetlink` if it does not exist."""
        try:
            replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, string(CTRL_ATTR_FAMILY_NAME, name))
        except KernelNBDError as exc:
            if exc.errno == errno_mod.ENOENT:
                raise NoNetlink(f"the kernel has no {name!r} netlink family (module not loaded?)") from exc
            raise
        for payload in replies:
            for kind, value in parse_attrs(payload):
                if kind == CTRL_ATTR_FAMILY_ID:
                    return int(struct.unpack_from("=H", value)[0])
        raise NoNetlink(f"no id in the kernel's answer about family {name!r}")


def connect_attrs(
    fds: Sequence[int],
    size: int,
    block_size: int,
    server_flags: int,
    *,
    index: int | None = None,
    timeout: int = 0,
    dead_conn_timeout: int = 0,
    client_flags: int = 0,
    identifier: str = "",
) -> bytes:
    """The attributes of NBD_CMD_CONNECT (also NBD_CMD_RECONFIGURE, which ignores sizes)."""
    parts = [
        u64(NBD_ATTR_SIZE_BYTES, size),
        u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size),
        u64(NBD_ATTR_SERVER_FLAGS, server_flags),
        u64(NBD_ATTR_CLIENT_FLAGS, client_flags),
        nested(NBD_ATTR_SOCKETS, *(nested(NBD_SOCK_ITEM, u32(NBD_SOCK_FD, fd)) for fd in fds)),
    ]
    if index is not None:
        parts.insert(0, u32(NBD_ATTR_INDEX, index))
    if timeout:
        parts.append(u64(NBD_ATTR_TIMEOUT, timeout))
    if dead_conn_timeout:
        parts.append(u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout))
    if identifier:
        parts.append(string(NBD_ATTR_BACKEND_IDENTIFIER, identifier))
    return b"".join(parts)


class NBDNetlink:
    """NBD_CMD_CONNECT / DISCONNECT / RECONFIGURE over generic netlink."""

    def __init__(self, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = GenlSocket(timeout)
        try:
            self.family = self.sock.family_id(NBD_FAMILY)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        """Close the netlink socket (the device stays configured)."""
        self.sock.close()

    def __enter__(self) -> NBDNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, attrs: bytes) -> int:
        """NBD_CMD_CONNECT with ``attrs`` (:func:`connect_attrs`); returns the device index."""
        replies = self.sock.request(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION, attrs)
        for payload in replies:
            for kind, value in parse_attrs(payload):
                if kind == NBD_ATTR_INDEX:
                    return int(struct.unpack_from("=I", value)[0])
        for kind, value in parse_attrs(attrs):
            if kind == NBD_ATTR_INDEX:
                return int(struct.unpack_from("=I", value)[0])
        raise KernelNBDError("the kernel connected a device but did not say which")

    def reconfigure(self, attrs: bytes) -> None:
        """NBD_CMD_RECONFIGURE: replace a configured device's dead connections with new sockets."""
        self.sock.request(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, attrs)

    def disconnect(self, index: int) -> None:
        """NBD_CMD_DISCONNECT of device ``index`` (the kernel sends NBD_CMD_DISC to the server)."""
        self.sock.request(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, u32(NBD_ATTR_INDEX, index))
