"""The VM harness itself: it boots Debian's kernel with the test modules and the host's python."""

from __future__ import annotations

from pathlib import Path

import pytest

from torus_core.testing.vm import GUEST_MODULES, VM, VMError, hidden_in_guest, modinfo, module_order

pytestmark = pytest.mark.vm


def test_guest_boots_with_kernel_clients_and_the_checkout_python(vm: VM) -> None:
    script = r"""
echo "CHECK kernel $(uname -r)"
[ -b /dev/nbd0 ] && echo "CHECK nbd-device ok"
grep -q '^nbd ' /proc/modules && echo "CHECK nbd-module ok"
grep -q '^target_core_user ' /proc/modules && echo "CHECK tcmu-module ok"
[ -d /sys/kernel/config/target ] && echo "CHECK configfs ok"
grep -qw xfs /proc/filesystems && grep -qw ext4 /proc/filesystems && echo "CHECK filesystems ok"
touch /tmp/w && echo "CHECK tmp-writable ok"
for t in nbd-client mkfs.ext4 e2fsck mkfs.xfs xfs_repair; do
  command -v "$t" >/dev/null && echo "CHECK tool-$t ok"
done
mkfs.xfs -V | grep -q 'mkfs.xfs version' && echo "CHECK xfs-runs ok"
"$TORUS_PY" -c 'import torus_core.nbd, sys; print("CHECK python", sys.prefix)'
"""
    res = vm.run(script, timeout=600).check()
    checks = " ".join(res.lines("CHECK"))
    release = vm.prepare().release
    assert f"CHECK kernel {release}" in checks
    names = ("xfs-runs", "nbd-device", "nbd-module", "tcmu-module", "configfs", "filesystems", "tmp-writable")
    for name in names:
        assert f"CHECK {name} ok" in checks, res.console
    for tool in ("nbd-client", "mkfs.ext4", "e2fsck", "mkfs.xfs", "xfs_repair"):
        assert f"CHECK tool-{tool} ok" in checks, res.console
    assert "CHECK python" in checks and ".venv" in checks


def test_failing_guest_script_reports_its_status(vm: VM) -> None:
    res = vm.run("echo CHECK before; exit 7", timeout=600)
    assert res.rc == 7 and res.lines("CHECK") == ["CHECK before"]
    with pytest.raises(VMError, match="exited 7"):
        res.check()


def test_modules_are_ordered_after_their_dependencies(vm: VM) -> None:
    moddir = vm.prepare().root / "lib" / "modules" / vm.prepare().release
    order = [p.name.removesuffix(".ko") for p in module_order(moddir, GUEST_MODULES)]
    assert order.index("target_core_mod") < order.index("target_core_user") < len(order)
    assert order.index("uio") < order.index("target_core_user")
    assert modinfo(moddir.rglob("nbd.ko").__next__())["license"] == ["GPL"]
    with pytest.raises(VMError, match="no_such_module not found"):
        module_order(moddir, ["no_such_module"])


def test_non_module_file_is_a_typed_error(tmp_path: Path) -> None:
    bogus = tmp_path / "x.ko"
    bogus.write_bytes(b"\x28\xb5\x2f\xfd compressed")
    with pytest.raises(VMError, match="not an ELF64"):
        modinfo(bogus)


def test_a_checkout_under_tmp_or_run_is_kept_visible_in_the_guest() -> None:
    # the guest puts a tmpfs on /tmp and /run; a clone in /tmp must be bind-mounted back once
    repo = Path("/tmp/ci-clone")
    assert hidden_in_guest(repo, repo / ".vm-cache") == [repo]
    assert hidden_in_guest(Path("/work/main"), Path("/work/main/.vm-cache")) == []
    assert hidden_in_guest(Path("/work/main"), Path("/run/cache")) == [Path("/run/cache")]
