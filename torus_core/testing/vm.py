"""A QEMU VM with Debian's own kernel, for tests of kernel clients (NBD, TCMU) on real filesystems.

This machine's kernel cannot load ``nbd``/``target_core_user``; a guest under QEMU's software
emulation (TCG; the host's KVM is a nested PVM that cannot run it) can. The harness builds
everything on the fly and caches it under ``.vm-cache/`` in the checkout:

* host packages (``qemu-system-x86``, ``busybox-static``, ``cpio``) are installed with apt when
  missing (as root; otherwise :class:`VMError` names them);
* guest packages (the kernel image, ``nbd-client``, ``e2fsprogs``, ``xfsprogs`` and their libraries)
  are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed;
* a busybox initramfs holds ``/init`` and the kernel modules the tests use with their
  dependencies (read from each ``.ko``'s ``.modinfo``, loaded in dependency order by ``insmod``).

:meth:`VM.run` boots ``qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1024`` with no network
device, shares the host's root read-only over 9p, and runs a shell script in a ``chroot`` of it
(so the checkout's own ``.venv`` python runs inside, with the guest's kernel); ``/tmp`` in the
chroot is a tmpfs, configfs is mounted, and ``PATH``/``LD_LIBRARY_PATH`` reach the unpacked guest
tools. The script's output comes back over the serial console, ending with the result line
``TORUS-VM-RESULT rc=N``. Every wait is bounded; qemu is killed by its PID on timeout.

Usage::

    vm = VM()                 # prepare() runs on first use; the cache is shared, flock'ed
    res = vm.run("mkfs.ext4 -q /dev/nbd0 && echo CHECK mkfs ok", timeout=300)
    res.check()               # VMError unless rc == 0
    assert "CHECK mkfs ok" in res.lines("CHECK")
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torus_core.errors import TorusError

log = logging.getLogger(__name__)

#: Checkout root (the directory holding ``torus_core``).
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".vm-cache"
#: Host command -> the Debian package providing it.
HOST_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static", "cpio": "cpio"}
#: Guest packages (only unpacked); the kernel image package is resolved from linux-image-amd64.
GUEST_PACKAGES = (
    "nbd-client",
    "libnl-3-200",
    "libnl-genl-3-200",
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    "libss2",
    "xfsprogs",
    "libinih1",
    "liburcu8",
)
#: Guest binaries checked (with ``ldd``) to find all their libraries after unpacking.
GUEST_TOOLS = ("sbin/nbd-client", "sbin/mkfs.ext4", "sbin/e2fsck", "sbin/mkfs.xfs", "sbin/xfs_repair")
#: Kernel modules loaded at boot (their dependencies are added and ordered automatically).
GUEST_MODULES = (
    "crc32c_generic",
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "nbd",
    "ext4",
    "xfs",
    "configfs",
    "uio",
    "target_core_mod",
    "target_core_user",
    "tcm_loop",
)
#: Bump to rebuild caches made by an older harness.
CACHE_VERSION = "1"
RESULT_PREFIX = "TORUS-VM-RESULT rc="
#: Seconds for apt operations and for building the guest.
APT_TIMEOUT = 600.0


class VMError(TorusError):
    """The VM could not be prepared or booted, timed out, or the guest script failed."""


@dataclass(frozen=True)
class GuestImage:
    """What one boot needs: kernel, initramfs, and the unpacked guest packages' root."""

    kernel: Path
    initramfs: Path
    root: Path
    release: str


@dataclass
class VMResult:
    """The outcome of :meth:`VM.run`: the guest script's exit status and the console text."""

    rc: int
    console: str
    elapsed: float
    script: str = field(repr=False, default="")

    def lines(self, prefix: str) -> list[str]:
        """Console lines starting with ``prefix`` (stripped of carriage returns)."""
        return [ln.strip() for ln in self.console.splitlines() if ln.strip().startswith(prefix)]

    def check(self) -> VMResult:
        """Return self if the script exited 0, else raise VMError with the console's tail."""
        if self.rc != 0:
            raise VMError(f"guest script exited {self.rc}; console tail:\n{tail(self.console)}")
        return self


def tail(text: str, lines: int = 60) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = APT_TIMEOUT) -> str:
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise VMError(f"{cmd[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise VMError(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise VMError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def ensure_host_packages() -> None:
    """Install the missing host packages with apt (root only); VMError naming them otherwise."""
    missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise VMError(f"the VM tests need these Debian packages: {' '.join(missing)} (apt-get install them)")
    log.info("installing host packages %s", missing)
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q"]
    try:
        _run([*env_cmd, "--no-install-recommends", *missing])
    except VMError:
        _run(["apt-get", "update", "-q"])
        _run([*env_cmd, "--no-install-recommends", *missing])
    still = [cmd for cmd in HOST_PACKAGES if shutil.which(cmd) is None]
    if still:
        raise VMError(f"still missing after apt-get install: {' '.join(still)}")


def kernel_package() -> str:
    """The versioned image package ``linux-image-amd64`` depends on (e.g. linux-image-6.1.0-57-amd64)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
    found = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not found:
        raise VMError("apt-cache knows no linux-image-amd64 (is a Debian apt source configured?)")
    return str(found[0])


def _download(debs: Path, packages: Sequence[str]) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    try:
        _run(["apt-get", "download", "-q", *packages], cwd=debs)
    except VMError:
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", "-q", *packages], cwd=debs)


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module (ELF64 little-endian) as key -> values."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise VMError(f"{ko}: not an ELF64 little-endian kernel module (compressed?)")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _typ, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    result: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                result.setdefault(key, []).append(value)
    return result


def module_order(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """``.ko`` files of ``wanted`` and their dependencies, dependencies first.

    Built-in modules (``modules.builtin``) are skipped; an unknown module is a VMError.
    """
    index = {p.name[: -len(".ko")].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        lines = builtin_file.read_text().split()
        builtin = {Path(ln).name.removesuffix(".ko").replace("-", "_") for ln in lines}
    order: list[Path] = []
    state: dict[str, int] = {}

    def visit(name: str, depth: int) -> None:
        name = name.replace("-", "_")
        if state.get(name) == 2 or (name in builtin and name not in index):
            return
        if depth > 64 or state.get(name) == 1:
            raise VMError(f"kernel module dependency cycle at {name}")
        ko = index.get(name)
        if ko is None:
            raise VMError(f"kernel module {name} not found under {moddir}")
        state[name] = 1
        info = modinfo(ko)
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep, depth + 1)
        state[name] = 2
        order.append(ko)

    for name in wanted:
        visit(name, 0)
    return order


_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /host /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
for m in $(cat /modules/order); do insmod /modules/$m 2>/dev/null || echo "insmod $m failed"; done
script=$(sed -n 's/.*torus_script=\([^ ]*\).*/\1/p' /proc/cmdline)
rc=99
if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostshare /host; then
  mkdir -p /dev/shm && mount --bind /dev /host/dev && mount -t tmpfs -o mode=1777 shm /host/dev/shm
  mount --bind /proc /host/proc && mount --bind /sys /host/sys
  mount -t configfs configfs /host/sys/kernel/config 2>/dev/null
  # host dirs the guest must still see under the tmpfs put on /tmp and /run (a checkout in /tmp)
  keep=$(sed -n 's/.*torus_keep=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
  i=0; for p in $keep; do mkdir -p /keep/$i && mount --bind "/host$p" /keep/$i; i=$((i+1)); done
  mount -t tmpfs -o mode=1777,size=700m tmp /host/tmp && mount -t tmpfs run /host/run
  i=0; for p in $keep; do mkdir -p "/host$p" && mount --bind /keep/$i "/host$p"; i=$((i+1)); done
  echo TORUS-VM-START
  chroot /host /bin/sh "$script" </dev/null
  rc=$?
else
  echo "cannot mount the host share"
fi
echo "TORUS-VM-RESULT rc=$rc"
sync
poweroff -f
"""


#: Host directories the guest covers with a tmpfs of its own (see ``_INIT``).
GUEST_TMPFS = (Path("/tmp"), Path("/run"))


def hidden_in_guest(*paths: Path) -> list[Path]:
    """Those of ``paths`` (resolved, without duplicates or nesting) that lie under a directory
    the guest covers with a tmpfs, e.g. a checkout cloned into /tmp: the guest bind-mounts them
    back so the chroot still sees the project and its venv."""
    out: list[Path] = []
    for p in sorted({p.resolve() for p in paths}, key=lambda q: len(q.parts)):
        if any(p.is_relative_to(t) for t in GUEST_TMPFS) and not any(p.is_relative_to(o) for o in out):
            out.append(p)
    return out


class VM:
    """Boots the guest and runs scripts in it (see the module docstring)."""

    def __init__(self, cache: Path = DEFAULT_CACHE, memory_mb: int = 1024) -> None:
        self.cache = cache
        self.memory_mb = memory_mb
        self._image: GuestImage | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as fh:
            deadline = time.monotonic() + APT_TIMEOUT
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise VMError(f"{self.cache}/.lock held for {APT_TIMEOUT:.0f} s") from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def prepare(self) -> GuestImage:
        """Install host packages, fetch and unpack the guest, build the initramfs (cached)."""
        if self._image is not None:
            return self._image
        ensure_host_packages()
        with self._locked():
            image = self._load() or self._build()
        self._image = image
        return image

    def _load(self) -> GuestImage | None:
        stamp = self.cache / "stamp"
        if not stamp.exists() or stamp.read_text().split("\n")[0] != CACHE_VERSION:
            return None
        release = stamp.read_text().split("\n")[1]
        root = self.cache / "guest"
        kernel = root / "boot" / f"vmlinuz-{release}"
        if not kernel.exists():
            return None
        initramfs = self._initramfs_path(release)
        if not initramfs.exists():
            self._initramfs(root / "lib" / "modules" / release, initramfs)
        return GuestImage(kernel=kernel, initramfs=initramfs, root=root, release=release)

    def _initramfs_path(self, release: str) -> Path:
        """The initramfs is rebuilt whenever /init or the module list change."""
        digest = hashlib.sha256(f"{_INIT}\n{GUEST_MODULES}\n{release}".encode()).hexdigest()[:12]
        return self.cache / f"initramfs-{digest}.cpio.gz"

    def _build(self) -> GuestImage:
        kpkg = kernel_package()
        debs = self.cache / "debs"
        root = self.cache / "guest"
        shutil.rmtree(debs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        log.info("downloading guest packages into %s", debs)
        _download(debs, [kpkg, *GUEST_PACKAGES])
        root.mkdir(parents=True)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if len(releases) != 1:
            raise VMError(f"expected one kernel under {root}/lib/modules, found {releases}")
        release = releases[0]
        kernel = root / "boot" / f"vmlinuz-{release}"
        if not kernel.exists():
            raise VMError(f"{kpkg} has no {kernel.name}")
        self._check_tools(root)
        initramfs = self._initramfs(root / "lib" / "modules" / release, self._initramfs_path(release))
        (self.cache / "stamp").write_text(f"{CACHE_VERSION}\n{release}\n")
        return GuestImage(kernel=kernel, initramfs=initramfs, root=root, release=release)

    @staticmethod
    def _check_tools(root: Path) -> None:
        env = dict(os.environ, LD_LIBRARY_PATH=guest_library_path(root))
        for tool in GUEST_TOOLS:
            path = root / tool
            if not path.exists():
                raise VMError(f"guest tool {tool} missing from the unpacked packages")
            out = subprocess.run(
                ["ldd", str(path)], capture_output=True, text=True, timeout=30, env=env, check=False
            ).stdout
            missing = [ln.split()[0] for ln in out.splitlines() if "not found" in ln]
            if missing:
                raise VMError(f"guest tool {tool} needs libraries no package provided: {missing}")

    def _initramfs(self, moddir: Path, out: Path) -> Path:
        busybox = shutil.which("busybox")
        if busybox is None:
            raise VMError("busybox not found (Debian package busybox-static)")
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            staging = Path(tmp)
            (staging / "bin").mkdir()
            shutil.copy2(busybox, staging / "bin" / "busybox")
            (staging / "init").write_text(_INIT)
            (staging / "init").chmod(0o755)
            mods = staging / "modules"
            mods.mkdir()
            names = []
            for ko in module_order(moddir, GUEST_MODULES):
                shutil.copy2(ko, mods / ko.name)
                names.append(ko.name)
            (mods / "order").write_text("\n".join(names) + "\n")
            files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
            proc = subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                cwd=staging,
                input="\n".join(files).encode(),
                capture_output=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                raise VMError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
            for old in self.cache.glob("initramfs-*.cpio.gz"):
                old.unlink()
            out.write_bytes(gzip.compress(proc.stdout, compresslevel=1))
        return out

    @contextlib.contextmanager
    def shared_dir(self) -> Iterator[Path]:
        """A fresh host directory the guest sees at the same path (read-only), removed after.

        It lives under the cache: the guest's ``/tmp`` is its own tmpfs, hiding the host's.
        """
        base = self.cache / "share"
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=base))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def preamble(self) -> str:
        """Shell lines every guest script starts with: PATH, LD_LIBRARY_PATH, TMPDIR, cwd."""
        image = self.prepare()
        root = image.root
        path = ":".join(str(root / d) for d in ("sbin", "usr/sbin", "usr/bin", "bin"))
        return (
            "set -u\n"
            f"export PATH={path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"export LD_LIBRARY_PATH={guest_library_path(root)}\n"
            "export TMPDIR=/tmp HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1\n"
            f"export TORUS_REPO={shlex.quote(str(REPO))}\n"
            f"export TORUS_PY={shlex.quote(str(REPO / '.venv/bin/python'))}\n"
            f"cd {shlex.quote(str(REPO))}\n"
        )

    def command(self, script: Path, console: Path) -> list[str]:
        """The qemu command line booting the guest to run ``script`` (a host path)."""
        image = self.prepare()
        append = f"console=ttyS0 panic=-1 quiet loglevel=4 torus_script={script}"
        keep = hidden_in_guest(REPO, self.cache)
        if keep:
            append += " torus_keep=" + ",".join(str(p) for p in keep)
        return [
            "qemu-system-x86_64",
            "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(self.memory_mb),
            "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", append,
            "-device", "virtio-rng-pci",
            "-virtfs", "local,path=/,mount_tag=hostshare,security_model=none,readonly=on,multidevs=remap",
        ]  # fmt: skip

    def run(self, script: str, timeout: float = 300.0) -> VMResult:
        """Boot, run ``script`` (sh) in the chroot after :meth:`preamble`, power off.

        Returns once the result line appears and qemu exited, or raises VMError when ``timeout``
        seconds pass first (qemu is killed by PID) or qemu fails to start.
        """
        if re.search(r"\s", str(self.cache)):
            raise VMError(f"the VM cache path must not contain whitespace: {self.cache}")
        self.prepare()
        runs = self.cache / "runs"
        runs.mkdir(exist_ok=True)
        run_dir = runs / uuid.uuid4().hex[:12]
        run_dir.mkdir()
        script_path = run_dir / "script.sh"
        full = self.preamble() + script
        script_path.write_text(full)
        console = run_dir / "console.log"
        console.touch()
        start = time.monotonic()
        err = open(run_dir / "qemu.err", "wb")
        try:
            proc = subprocess.Popen(
                self.command(script_path, console),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        except OSError as exc:
            err.close()
            raise VMError(f"cannot start qemu-system-x86_64: {exc}") from exc
        try:
            rc = self._wait(proc, console, start + timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            err.close()
            text = console.read_text(errors="replace")
            shutil.rmtree(run_dir, ignore_errors=True)
        return VMResult(rc=rc, console=text, elapsed=time.monotonic() - start, script=full)

    @staticmethod
    def _wait(proc: subprocess.Popen[bytes], console: Path, deadline: float) -> int:
        rc: int | None = None
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace")
            idx = text.find(RESULT_PREFIX)
            if idx >= 0:
                m = re.match(r"-?\d+", text[idx + len(RESULT_PREFIX) :])
                if m:
                    rc = int(m.group())
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(15)
                    return rc
            if proc.poll() is not None:
                err = (console.parent / "qemu.err").read_text(errors="replace")
                raise VMError(f"qemu exited {proc.returncode} without a result: {err}\n{tail(text)}")
            time.sleep(0.25)
        text = console.read_text(errors="replace")
        raise VMError(f"guest did not finish in time; console tail:\n{tail(text)}")


def guest_library_path(root: Path) -> str:
    """``LD_LIBRARY_PATH`` reaching the libraries of the unpacked guest packages."""
    return ":".join(str(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
