"""Shell building blocks of the VM tests (tests/vm): a torus data dir made on the host, guest helpers.

The host formats the cluster and creates the volumes (Python starts ~10x slower under TCG);
the guest copies that directory into its tmpfs. Guest checks print ``CHECK <name> ok`` or
``CHECK <name> FAIL <why>``; :func:`checks` collects them and the tests assert on names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torus_core.testing.vm import VM, VMResult, tail

BIN = Path(sys.executable).parent
MiB = 1 << 20


def make_cluster(data: Path, volumes: dict[str, str], block_size: str = "64KiB") -> None:
    """Format a single-node cluster with SQLite metadata in ``data`` and create ``volumes``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    cmds = [["init", "--block-size", block_size]]
    cmds += [["volume", "create-block", name, size] for name, size in volumes.items()]
    for args in cmds:
        subprocess.run(
            [str(BIN / "torusctl"), "--data-dir", str(data), *args],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )


def checks(res: VMResult) -> dict[str, str]:
    """``{name: "ok" | "FAIL ..."}`` of the guest's CHECK lines (the last one of a name wins)."""
    out: dict[str, str] = {}
    for line in res.lines("CHECK "):
        _, name, *rest = line.split(" ", 2)
        out[name] = " ".join(rest)
    return out


def failed(found: dict[str, str], expected: list[str]) -> list[str]:
    """Expected check names that did not report ok (missing or FAIL)."""
    return [f"{name}: {found.get(name, 'missing')}" for name in expected if found.get(name) != "ok"]


#: Shell functions every guest script of these tests starts with (after the harness preamble), from
#: vm_guest.sh. ``$SHARE`` (the host-made data dir) must be set before.
HELPERS = (Path(__file__).parent / "vm_guest.sh").read_text()


def run_guest(vm: VM, volumes: dict[str, str], body: str, timeout: float = 840.0) -> dict[str, str]:
    """Make a cluster with ``volumes`` on the host, run :data:`HELPERS` + ``body`` in the guest,
    and return its checks (:func:`checks`) plus ``_console``: the console's last 80 lines."""
    with vm.shared_dir() as share:
        make_cluster(share, volumes)
        res = vm.run(f"SHARE={share}\n{HELPERS}\n{body}", timeout=timeout)
    found = checks(res)
    found["_console"] = tail(res.console, 80)
    print(f"guest run {res.elapsed:.0f} s:", " ".join(ln[2:] for ln in res.lines("T ")))
    return found
