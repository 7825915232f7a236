"""``torusblk tcmu`` in the VM: the volume becomes /dev/sdX through target_core_user + tcm_loop,
and real filesystems live on it.

Each test is one boot, on a local SQLite + file-store cluster in the guest's tmpfs:

1. ext4: mkfs, mount, files with checksums, fsync, umount, ``e2fsck -fn`` clean, remount and
   verify, ``fstrim`` (UNMAP through the handler); then SIGTERM: the disk goes away and the
   configfs objects are removed. (xfs needs a volume of at least 300 MB: too slow under TCG.)
2. crash: ext4 written by a loop that fsyncs each file, ``torusblk tcmu`` SIGKILLed mid-way and
   restarted: it reattaches to the kernel's backstore, the blocked writes complete, fsck is clean
   and every file fsync'd before the kill reads back intact.
"""

from __future__ import annotations

import shlex

import pytest

from torus_core.testing.vm import VM, VMResult, module_order

pytestmark = pytest.mark.vm

#: /dev/sdX needs the SCSI disk driver, which the harness's module list does not load
SD_MODULES = ("crct10dif_generic", "crc64_rocksoft_generic", "sd_mod")

SETUP = r"""
D=/tmp/torus-data; LOG=/tmp/tcmu.log
TB="$TORUS_REPO/.venv/bin/torusblk"; TC="$TORUS_REPO/.venv/bin/torusctl"
for m in $SD_KOS; do busybox insmod "$m" 2>/dev/null; done
[ -d /sys/module/sd_mod ] || { echo "FAIL sd_mod did not load"; exit 3; }
mkdir -p $D /tmp/mnt
$TC --data-dir $D init --block-size 64KiB >/dev/null \
  && $TC --data-dir $D volume create-block v 160MiB >/dev/null || { echo "FAIL cluster setup"; exit 3; }

start() {  # start torusblk tcmu; wait (bounded) for its serving line; sets $pid $dev
  : > $LOG
  $TB tcmu --data-dir $D --lease-ttl 60 --cmd-timeout 600 v >>$LOG 2>&1 &
  pid=$!
  i=0; while [ $i -lt 480 ] && ! grep -q 'TCMU SERVING' $LOG; do
    kill -0 $pid 2>/dev/null || break; sleep 0.5; i=$((i+1)); done
  dev=$(awk '/TCMU SERVING/ {print $4}' $LOG)
  [ -b "$dev" ] || { echo "FAIL no disk"; cat $LOG; exit 4; }
}
stop() {  # SIGTERM, wait (bounded)
  kill -TERM $pid; i=0; while [ $i -lt 240 ] && kill -0 $pid 2>/dev/null; do sleep 0.5; i=$((i+1)); done
  wait $pid; echo "CHECK exit=$?"
}
writefiles() {  # N files of varied sizes, checksums to $1
  for n in $(seq 1 $2); do head -c $((n * 37000 + 1)) /dev/urandom > /tmp/mnt/f$n; done
  sync; (cd /tmp/mnt && md5sum f*) > $1
}

"""

FILESYSTEM = r"""
start
echo "CHECK disk $dev $(cat /sys/block/${dev#/dev/}/device/vendor) $(readlink /dev/torus/v)"
echo "CHECK timeout $(cat /sys/block/${dev#/dev/}/device/timeout)"
echo "CHECK queue lbs=$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)" \
  "wc=$(cat /sys/class/scsi_disk/*/cache_type | tr ' ' _) fua=$(cat /sys/class/scsi_disk/*/FUA)" \
  "prov=$(cat /sys/class/scsi_disk/*/provisioning_mode)"
mkfs.ext4 -q -F $dev && mount $dev /tmp/mnt && echo "CHECK ext4 mounted"
writefiles /tmp/sums 8
umount /tmp/mnt && e2fsck -fn $dev >/tmp/fsck.out 2>&1 && echo "CHECK ext4 fsck clean" || cat /tmp/fsck.out
mount $dev /tmp/mnt && (cd /tmp/mnt && md5sum -c --quiet /tmp/sums) && echo "CHECK ext4 verified"
fstrim /tmp/mnt && echo "CHECK ext4 fstrim"
umount /tmp/mnt
stop
[ -b $dev ] || echo "CHECK disk removed"
[ -z "$(ls /sys/kernel/config/target/core | grep user_)" ] && echo "CHECK backstore removed"
if grep -q 'Traceback' $LOG; then echo "FAIL traceback"; cat $LOG; fi

"""


CRASH = r"""
start
mkfs.ext4 -q -F $dev && mount $dev /tmp/mnt && echo "CHECK crash mounted"
: > /tmp/synced
( for n in $(seq 1 40); do
    head -c $((n * 9000 + 1)) /dev/urandom > /tmp/mnt/c$n && sync /tmp/mnt/c$n \
      && (cd /tmp/mnt && md5sum c$n) >> /tmp/synced
  done; echo done > /tmp/writer.done ) &
writer=$!
i=0; while [ $i -lt 600 ] && [ "$(wc -l < /tmp/synced)" -lt 10 ]; do sleep 0.2; i=$((i+1)); done
kill -KILL $pid; wait $pid 2>/dev/null
echo "CHECK killed after $(wc -l < /tmp/synced) fsyncs"
start
grep -q 'reattaching' $LOG && echo "CHECK reattached $dev"
i=0; while [ $i -lt 600 ] && [ ! -f /tmp/writer.done ]; do sleep 0.5; i=$((i+1)); done
wait $writer
echo "CHECK writer finished $(wc -l < /tmp/synced) fsyncs"
umount /tmp/mnt && e2fsck -fn $dev >/tmp/fsck.out 2>&1 && echo "CHECK crash fsck clean" || cat /tmp/fsck.out
mount $dev /tmp/mnt && (cd /tmp/mnt && md5sum -c --quiet /tmp/synced) && echo "CHECK crash verified"
umount /tmp/mnt
dmesg | grep -E 'I/O error|EXT4-fs error|offline' | head -5 | sed 's/^/KERNEL /'
stop
"""


def _script(vm: VM, body: str) -> str:
    image = vm.prepare()
    kos = module_order(image.root / "lib" / "modules" / image.release, SD_MODULES)
    return f"SD_KOS={shlex.quote(' '.join(str(k) for k in kos))}\n" + SETUP + body


def _checks(res: VMResult) -> tuple[list[str], str]:
    checks = res.lines("CHECK")
    assert not res.lines("FAIL"), res.console[-6000:]
    assert not res.lines("KERNEL"), res.console[-6000:]
    return checks, "\n".join(checks) + "\n" + res.console[-4000:]


def test_tcmu_disk_carries_a_clean_ext4_and_goes_away_on_sigterm(vm: VM) -> None:
    res = vm.run(_script(vm, FILESYSTEM), timeout=600).check()
    checks, text = _checks(res)
    disk = [c for c in checks if c.startswith("CHECK disk /dev/sd")]
    assert disk and "CoreOS" in disk[0] and disk[0].endswith(disk[0].split()[2]), text
    assert "CHECK timeout 660" in checks, text
    assert "CHECK queue lbs=4096 wc=write_through fua=1 prov=unmap" in checks, text
    for step in ("ext4 mounted", "ext4 fsck clean", "ext4 verified", "ext4 fstrim", "exit=0"):
        assert f"CHECK {step}" in checks, f"{step} missing:\n{text}"
    assert "CHECK disk removed" in checks and "CHECK backstore removed" in checks, text


def test_killed_handler_restarts_and_reattaches_without_losing_fsynced_files(vm: VM) -> None:
    res = vm.run(_script(vm, CRASH), timeout=600).check()
    checks, text = _checks(res)
    killed = [int(c.split()[3]) for c in checks if c.startswith("CHECK killed after")]
    assert killed and 10 <= killed[0] < 40, text
    assert any(c.startswith("CHECK reattached /dev/sd") for c in checks), text
    assert "CHECK writer finished 40 fsyncs" in checks, text
    for step in ("crash mounted", "crash fsck clean", "crash verified", "exit=0"):
        assert f"CHECK {step}" in checks, f"{step} missing:\n{text}"
