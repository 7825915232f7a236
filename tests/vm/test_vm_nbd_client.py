"""Debian's ``nbd-client`` (the guest kernel's NBD client) against ``torusd --nbd-listen``.

torusd runs in the guest on its 127.0.0.1: mkfs.ext4 and mkfs.xfs, mount, write files, fsync,
umount, fsck clean, remount and verify; then SIGKILL torusd while a writer fsyncs files on xfs,
restart it, reconnect, and the log replays to a clean filesystem with every fsync'd file intact.
"""

from __future__ import annotations

import pytest

from torus_core.testing.vm import VM
from torus_core.testing.vm_guest import failed, run_guest

#: one VM boot per test; under a loaded 2-core machine a boot has taken 3-4x its quiet time
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def test_nbd_client_against_torusd_ext4_xfs_and_torusd_sigkill_and_kernel_nbd_flag(vm: VM) -> None:
    body = r"""
start_torusd() {
  $B/torusd --data-dir $D --size 900MiB --nbd-listen 127.0.0.1:10809 "$@" >/tmp/d.out 2>/tmp/d.err &
  DPID=$!
  wait_for /tmp/d.out "NBD LISTENING" 240
}
check torusd start_torusd --kernel-nbd kvol:/dev/nbd5
# torusd --kernel-nbd: its own local kernel device, beside its NBD listener
check kernel-attached grep -q 'NBD ATTACHED kvol /dev/nbd5 netlink' /tmp/d.out
check kernel-mkfs mkfs.ext4 -q -F /dev/nbd5
check kernel-fsck e2fsck -fn /dev/nbd5
check connect-e nbd-client 127.0.0.1 10809 /dev/nbd0 -name ext4vol -timeout 60
fs_cycle e /dev/nbd0 ext4
check disconnect-e nbd-client -d /dev/nbd0
check connect-x nbd-client 127.0.0.1 10809 /dev/nbd1 -name xfsvol -timeout 60 -connections 2
fs_cycle x /dev/nbd1 xfs
# crash: SIGKILL torusd while xfs is being written with fsyncs
check mount-x3 mount -t xfs /dev/nbd1 /tmp/m
writer /tmp/m/w /tmp/synced
check writing wait_lines /tmp/synced 15 240
kill -KILL $DPID
ok killed
nbd-client -d /dev/nbd1
wait_exit $WPID 60 || kill -KILL $WPID
check umount-dead umount /tmp/m
check torusd-restart start_torusd
check reconnect nbd-client 127.0.0.1 10809 /dev/nbd2 -name xfsvol -timeout 60
check replay-mount mount -t xfs /dev/nbd2 /tmp/m
check replay-umount umount /tmp/m
check repair xfs_repair -n /dev/nbd2
check verify-mount mount -t xfs -o ro /dev/nbd2 /tmp/m
check verify-synced verify_synced /tmp/m/w /tmp/synced
umount /tmp/m
nbd-client -d /dev/nbd2
kill -TERM $DPID; check stop wait_exit $DPID 120
"""
    found = run_guest(vm, {"ext4vol": "320MiB", "xfsvol": "320MiB", "kvol": "64MiB"}, body)
    names = [
        "torusd",
        "kernel-attached",
        "kernel-mkfs",
        "kernel-fsck",
        "connect-e",
        "disconnect-e",
        "connect-x",
    ]
    names += [f"{step}-{t}" for t in ("e", "x") for step in ("mkfs", "mount", "fsync", "umount", "fsck")]
    names += [f"{step}-{t}" for t in ("e", "x") for step in ("remount", "verify", "umount2")]
    names += ["mount-x3", "writing", "killed", "umount-dead", "torusd-restart", "reconnect"]
    names += ["replay-mount", "replay-umount", "repair", "verify-mount", "verify-synced", "stop"]
    assert not failed(found, names), (failed(found, names), found["_console"])
