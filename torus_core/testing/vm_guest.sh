D=/tmp/torus
B=$TORUS_REPO/.venv/bin
export TORUS_METADATA=sqlite:///$D/metadata.db
cp -a "$SHARE" $D || exit 10
mkdir -p /tmp/m
ok() { echo "CHECK $1 ok"; }
fail() { echo "CHECK $1 FAIL $2"; }
check() {
  local cname=$1; shift
  if "$@" >/tmp/check.out 2>&1; then ok "$cname"; else fail "$cname" "$(tail -c 300 /tmp/check.out | tr '\n' ' ')"; fi
}
stamp() { echo "T $1 $(cut -d' ' -f1 /proc/uptime)"; }
# wait_for FILE PATTERN SECONDS: bounded wait for a line in a file
wait_for() { n=0; while [ $n -lt $(($3 * 4)) ]; do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.25; n=$((n + 1)); done; return 1; }
# wait_exit PID SECONDS: bounded wait for a process to exit
wait_exit() { n=0; while kill -0 $1 2>/dev/null; do [ $n -ge $(($2 * 4)) ] && return 1; sleep 0.25; n=$((n + 1)); done; return 0; }
# attach TAG VOLUME [ARGS...]: start torusblk nbd in the background, sets PID_<TAG> and DEV_<TAG>
attach() {
  local tag=$1 vol=$2; shift 2
  $B/torusblk nbd --data-dir $D --size 900MiB "$vol" "$@" >/tmp/$tag.out 2>/tmp/$tag.err &
  eval PID_$tag=$!
  if wait_for /tmp/$tag.out "NBD ATTACHED" 240; then
    eval DEV_$tag=$(awk '/NBD ATTACHED/ {print $4}' /tmp/$tag.out)
    ok attach-$tag
  else
    fail attach-$tag "$(tail -c 400 /tmp/$tag.err | tr '\n' ' ')"
  fi
}
# fs_cycle TAG DEV FSTYPE: mkfs, mount, write files, fsync, umount, fsck, remount, verify
fs_cycle() {
  local tag=$1 dev=$2 fs=$3 i
  if [ "$fs" = xfs ]; then check mkfs-$tag mkfs.xfs -q -f "$dev"; else check mkfs-$tag mkfs.ext4 -q -F "$dev"; fi
  check mount-$tag mount -t "$fs" "$dev" /tmp/m
  mkdir -p /tmp/m/dir
  for i in 1 2 3 4 5; do head -c $((i * 37000)) /dev/urandom > /tmp/m/dir/small$i; done
  dd if=/dev/urandom of=/tmp/m/big bs=1M count=3 conv=fsync 2>/dev/null
  (cd /tmp/m && find . -type f | sort | xargs sha256sum) > /tmp/sums-$tag
  check fsync-$tag sync -f /tmp/m/big
  check umount-$tag umount /tmp/m
  if [ "$fs" = xfs ]; then check fsck-$tag xfs_repair -n "$dev"; else check fsck-$tag e2fsck -fn "$dev"; fi
  check remount-$tag mount -t "$fs" "$dev" /tmp/m
  check verify-$tag sh -c "cd /tmp/m && sha256sum -c --quiet /tmp/sums-$tag && [ \$(wc -l < /tmp/sums-$tag) -eq 6 ]"
  check umount2-$tag umount /tmp/m
}
# writer DIR LOG: in the background, write files with fsync (file and directory) until an error
# or 400 files / 150 s; after each fsync'd file append "NAME SHA256" to LOG. Sets WPID.
writer() {
  mkdir -p "$1"
  $TORUS_PY -c '
import hashlib, os, sys, time
d, log = sys.argv[1], open(sys.argv[2], "a")
dfd = os.open(d, os.O_RDONLY)
deadline = time.monotonic() + 150
for i in range(400):
    if time.monotonic() > deadline:
        break
    data = os.urandom(4096 * (1 + i % 24))
    name = "f%04d" % i
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.fsync(dfd)
    log.write("%s %s\n" % (name, hashlib.sha256(data).hexdigest()))
    log.flush()
' "$1" "$2" 2>/tmp/writer.err &
  WPID=$!
}
# wait_lines FILE N SECONDS: bounded wait until FILE has at least N lines
wait_lines() { n=0; while [ $n -lt $(($3 * 4)) ]; do [ "$(wc -l < "$1" 2>/dev/null || echo 0)" -ge "$2" ] && return 0; sleep 0.25; n=$((n + 1)); done; return 1; }
# verify_synced DIR LOG: every file in LOG reads back with its checksum
verify_synced() {
  local vf vs
  [ -s "$2" ] || return 1
  while read -r vf vs; do [ "$(sha256sum "$1/$vf" | cut -d' ' -f1)" = "$vs" ] || { echo "bad $vf"; return 1; }; done < "$2"
}
