"""Real filesystems on torus volumes through the guest kernel's NBD client.

(a) ``torusblk nbd`` (kernel attach over netlink and over the ioctls) and (b) Debian's
``nbd-client`` against ``torusd --nbd-listen`` (in the guest, on its 127.0.0.1): mkfs.ext4 and
mkfs.xfs, mount, write files, fsync, umount, ``e2fsck -fn`` / ``xfs_repair -n`` clean, remount and
verify. Crash: SIGKILL the torus process while a writer fsyncs files, reattach, fsck clean and
every fsync'd file intact. One VM boot per test, several checks per boot.
"""

from __future__ import annotations

import pytest

from torus_core.testing.vm import VM
from torus_core.testing.vm_guest import failed, run_guest

#: one VM boot per test; under a loaded 2-core machine a boot has taken 3-4x its quiet time
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def test_torusblk_nbd_ext4_over_netlink_then_reattach_and_xfs_over_ioctls(vm: VM) -> None:
    body = r"""
stamp start
attach e ext4vol
stamp attached
check netlink grep -q 'netlink$' /tmp/e.out
check backend-id grep -qx 'torus:ext4vol' /sys/block/${DEV_e#/dev/}/backend
check size [ "$(cat /sys/block/${DEV_e#/dev/}/size)" = 655360 ]
fs_cycle e "$DEV_e" ext4
# a second attach of the same volume (another data dir) is refused, naming the holder
$B/torusblk nbd --data-dir /tmp/other --size 64MiB ext4vol >/tmp/l.out 2>/tmp/l.err
echo "rc=$?" >> /tmp/l.err
check locked-refused grep -q 'rc=1' /tmp/l.err
check locked-holder grep -q "is locked by .* until " /tmp/l.err
kill -TERM $PID_e
check sigterm-exit wait_exit $PID_e 120
wait $PID_e; check sigterm-status [ $? -eq 0 ]
check detached [ "$(cat /sys/block/${DEV_e#/dev/}/size)" = 0 ]
stamp ext4
# after SIGTERM (sync + unlock) the volume reattaches, now over the ioctls, with its files intact
attach x ext4vol --interface ioctl --connections 1
check ioctl grep -q 'ioctl$' /tmp/x.out
check reattach-mount mount -t ext4 -o ro "$DEV_x" /tmp/m
check reattach-verify sh -c "cd /tmp/m && sha256sum -c --quiet /tmp/sums-e"
umount /tmp/m
fs_cycle x "$DEV_x" xfs
check dash-d $B/torusblk nbd -d "$DEV_x"
check dash-d-exit wait_exit $PID_x 120
wait $PID_x; check dash-d-status [ $? -eq 0 ]
stamp end
"""
    found = run_guest(vm, {"ext4vol": "320MiB"}, body)
    names = ["attach-e", "netlink", "backend-id", "size"]
    names += [f"{step}-{t}" for t in ("e", "x") for step in ("mkfs", "mount", "fsync", "umount", "fsck")]
    names += [f"{step}-{t}" for t in ("e", "x") for step in ("remount", "verify", "umount2")]
    names += ["locked-refused", "locked-holder", "sigterm-exit", "sigterm-status", "detached"]
    names += [
        "attach-x",
        "ioctl",
        "reattach-mount",
        "reattach-verify",
        "dash-d",
        "dash-d-exit",
        "dash-d-status",
    ]
    assert not failed(found, names), (failed(found, names), found["_console"])


def test_torusblk_nbd_sigkill_mid_fsync_then_reattach_is_clean(vm: VM) -> None:
    body = r"""
attach c crashvol --dead-conn-timeout 2
check mkfs mkfs.ext4 -q -F "$DEV_c"
check mount mount -t ext4 "$DEV_c" /tmp/m
writer /tmp/m/w /tmp/synced
check writing wait_lines /tmp/synced 15 240
kill -KILL $PID_c
ok killed
echo "SYNCED-BEFORE-KILL $(wc -l < /tmp/synced)"
# detaching the dead device fails the I/O still queued; the writer stops on the error
check dash-d-dead $B/torusblk nbd -d "$DEV_c"
wait_exit $WPID 60 || kill -KILL $WPID
echo "SYNCED-AT-END $(wc -l < /tmp/synced)"
check umount-dead umount /tmp/m
attach r crashvol
check replay-mount mount -t ext4 "$DEV_r" /tmp/m
check replay-umount umount /tmp/m
check fsck e2fsck -fn "$DEV_r"
check verify-mount mount -t ext4 -o ro "$DEV_r" /tmp/m
check verify-synced verify_synced /tmp/m/w /tmp/synced
umount /tmp/m
kill -TERM $PID_r; check stop wait_exit $PID_r 120
"""
    found = run_guest(vm, {"crashvol": "256MiB"}, body)
    names = ["attach-c", "mkfs", "mount", "writing", "killed", "dash-d-dead", "umount-dead", "attach-r"]
    names += ["replay-mount", "replay-umount", "fsck", "verify-mount", "verify-synced", "stop"]
    assert not failed(found, names), (failed(found, names), found["_console"])
