"""Kernel NBD attach on the host: wire encoding, argument checks and clear errors.

This machine's kernel has no nbd module, so the attach itself is tested in the VM
(tests/vm/test_vm_kernel_nbd.py); here a host without it must get a typed error naming what is
missing, never a crash or a hang.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from torus_core.errors import InvalidArgument, TorusError
from torus_core.kernel_nbd import KernelAttachment, KernelNBDError, NoNetlink
from torus_core.kernel_nbd import netlink as nl
from torus_core.kernel_nbd.ioctl import device_index
from torus_core.nbd.memory import MemoryExport, MemoryStore

BIN = Path(sys.executable).parent
HAS_NBD = Path("/sys/module/nbd").exists()


def test_connect_attributes_nest_every_socket_fd() -> None:
    raw = nl.connect_attrs(
        [5, 7], 1 << 20, 4096, 0x3, index=2, timeout=30, dead_conn_timeout=9, identifier="x"
    )
    attrs = dict(nl.parse_attrs(raw))
    assert struct.unpack("=I", attrs[nl.NBD_ATTR_INDEX]) == (2,)
    assert struct.unpack("=Q", attrs[nl.NBD_ATTR_SIZE_BYTES]) == (1 << 20,)
    assert struct.unpack("=Q", attrs[nl.NBD_ATTR_BLOCK_SIZE_BYTES]) == (4096,)
    assert struct.unpack("=Q", attrs[nl.NBD_ATTR_DEAD_CONN_TIMEOUT]) == (9,)
    assert attrs[nl.NBD_ATTR_BACKEND_IDENTIFIER] == b"x\0"
    items = list(nl.parse_attrs(attrs[nl.NBD_ATTR_SOCKETS]))
    fds = [struct.unpack("=I", dict(nl.parse_attrs(item))[nl.NBD_SOCK_FD])[0] for _, item in items]
    assert [k for k, _ in items] == [nl.NBD_SOCK_ITEM, nl.NBD_SOCK_ITEM] and fds == [5, 7]
    # every attribute is padded to 4 bytes, so the whole buffer parses back completely
    assert len(raw) % 4 == 0


@pytest.mark.parametrize("path", ["/dev/sda", "nbd0", "/dev/nbd", "/dev/nbd0p1", ""])
def test_device_path_must_be_dev_nbd_n(path: str) -> None:
    with pytest.raises(InvalidArgument, match="not an NBD device path"):
        device_index(path)
    assert device_index("/dev/nbd12") == 12


def test_bad_attachment_arguments_are_refused_before_anything_opens() -> None:
    opened: list[int] = []

    def opener() -> MemoryExport:
        opened.append(1)
        return MemoryExport("m", MemoryStore(1 << 20))

    for kwargs in ({"connections": 0}, {"interface": "sysfs"}, {"timeout": -1}, {"device": "/dev/vda"}):
        with pytest.raises(InvalidArgument):
            KernelAttachment(opener, **kwargs)  # type: ignore[arg-type]
    assert opened == []


@pytest.mark.skipif(HAS_NBD, reason="this kernel has the nbd module: the VM tests cover attach")
def test_without_kernel_nbd_attach_fails_with_a_typed_error_and_closes_the_export() -> None:
    store = MemoryStore(1 << 20)
    exports: list[MemoryExport] = []

    def opener() -> MemoryExport:
        exports.append(MemoryExport("m", store))
        return exports[-1]

    with pytest.raises(NoNetlink, match="'nbd' netlink family"):
        KernelAttachment(opener, interface="netlink", connections=1).start()
    with pytest.raises(KernelNBDError, match="nbd module"):
        KernelAttachment(opener, interface="ioctl", connections=1).start()
    with pytest.raises(TorusError):
        KernelAttachment(opener, connections=1).start()
    assert len(exports) == 3 and all(e.closed for e in exports)


def _torusblk(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    return subprocess.run(
        [str(BIN / "torusblk"), "nbd", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_usage_errors_are_one_line_messages() -> None:
    cases = {
        (): "missing VOLUME",
        ("vol", "-d", "/dev/nbd0"): "not both",
        ("vol", "/dev/sda"): "not an NBD device path",
        ("-d", "/dev/sda"): "not an NBD device path",
    }
    for args, message in cases.items():
        proc = _torusblk(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


@pytest.mark.skipif(HAS_NBD, reason="this kernel has the nbd module")
def test_cli_detach_without_kernel_nbd_names_what_is_missing() -> None:
    proc = _torusblk("-d", "/dev/nbd0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "/dev/nbd0" in proc.stderr


def test_torusd_kernel_nbd_spec_is_volume_with_an_optional_device() -> None:
    from torus_core.cli.kernel_nbd_cmd import parse_kernel_nbd_spec
    from torus_core.errors import UsageError

    assert parse_kernel_nbd_spec("vol") == ("vol", None)
    assert parse_kernel_nbd_spec("a:b:/dev/nbd3") == ("a:b", "/dev/nbd3")
    with pytest.raises(InvalidArgument, match="not an NBD device path"):
        parse_kernel_nbd_spec("vol:/dev/sda")
    with pytest.raises(UsageError):
        parse_kernel_nbd_spec(":/dev/nbd1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    proc = subprocess.run(
        [str(BIN / "torusd"), "--kernel-nbd", "vol:/dev/vda"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1 and "not an NBD device path" in proc.stderr and "Traceback" not in proc.stderr
