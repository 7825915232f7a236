"""Real ``torusd`` processes on 127.0.0.1 for multi-process tests and ``bench/cluster.py``.

:class:`TorusdProcess` starts ``python -m torus_core.cli.torusd`` with a data dir, a peer RPC
listener and an NBD listener on free ports, waits (bounded) for its ``PEER LISTENING`` and
``NBD LISTENING`` lines, and is stopped by its PID only: SIGTERM + bounded wait + SIGKILL, or an
immediate SIGKILL for crash tests. A restart reuses the data dir (same UUID, same blocks) and the
same ports. :func:`torusctl` runs the admin CLI as a subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from torus_core.testing.services import free_port

#: Seconds a torusd gets to print its listening lines.
START_TIMEOUT = 30.0
#: Seconds a torusd gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0


#: Import roots children use instead of this process's (see :func:`children_run_tree`).
_tree_override: list[str] | None = None


def tree_paths(root: Path) -> list[str]:
    """Import roots of the torus checkout at ``root``: its plugins' packages, then core."""
    return [str(p) for p in sorted(root.glob("plugins/torus_*"))] + [str(root)]


@contextlib.contextmanager
def children_run_tree(root: Path) -> Iterator[None]:
    """Children started inside this block run the torus checkout at ``root`` (core and plugins)
    instead of this process's code: a benchmark measures two commits in one run."""
    global _tree_override
    if not (root / "torus_core" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root} is not a torus checkout (no torus_core/__init__.py)")
    previous, _tree_override = _tree_override, tree_paths(root)
    try:
        yield
    finally:
        _tree_override = previous


def source_paths() -> list[str]:
    """Import roots of the ``torus_core`` and plugin packages this process runs.

    Children get them first on ``PYTHONPATH`` (:func:`child_env`), so a ``torusd`` started from a
    test or a benchmark runs the very code the caller imported -- not whatever tree the
    environment's editable installs happen to point at (inside :func:`children_run_tree`: that
    tree's)."""
    if _tree_override is not None:
        return list(_tree_override)
    roots: list[str] = []
    names = ["torus_core"]
    for ep in entry_points(group="torus"):
        names.append(ep.value.split(":")[0].split(".")[0])
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if locations:
            root = os.path.dirname(os.path.abspath(locations[0]))
            if root not in roots:
                roots.append(root)
    return roots


def child_env() -> dict[str, str]:
    """``os.environ`` with :func:`source_paths` prepended to ``PYTHONPATH``."""
    env = dict(os.environ)
    parts = source_paths() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    # ``python -m`` puts the working directory first on sys.path: started from a checkout's
    # root, a child would import that checkout instead of the PYTHONPATH above (a benchmark's
    # --baseline then measured this tree twice)
    env["PYTHONSAFEPATH"] = "1"
    return env


def torusctl(metadata: str, *args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run ``torusctl --metadata URL ARGS`` and return its stdout (RuntimeError on failure)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torus_core.cli.torusctl", "--metadata", metadata, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"torusctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class TorusdProcess:
    """One storage daemon.

    :param metadata: metadata URL.
    :param data_dir: its data directory (kept across restarts).
    :param size: block store capacity (e.g. ``"256MiB"``).
    :param extra: further torusd arguments (heartbeat, rebalance, levels, ...).
    """

    metadata: str
    data_dir: Path
    size: str = "256MiB"
    block_store: str = "file"
    auto_join: bool = True
    nbd: bool = True
    extra: tuple[str, ...] = ()
    peer_port: int = field(default_factory=free_port)
    nbd_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    uuid: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        """PID of the running process, if any."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def peer_address(self) -> str:
        """``127.0.0.1:port`` of its peer RPC server."""
        return f"127.0.0.1:{self.peer_port}"

    @property
    def nbd_uri(self) -> str:
        """``nbd://127.0.0.1:port`` (append ``/VOLUME``)."""
        return f"nbd://127.0.0.1:{self.nbd_port}"

    def command(self) -> list[str]:
        """The full command line."""
        cmd = [
            sys.executable,
            "-m",
            "torus_core.cli.torusd",
            "--metadata",
            self.metadata,
            "--data-dir",
            str(self.data_dir),
            "--size",
            self.size,
            "--block-store",
            self.block_store,
            "--peer-address",
            self.peer_address,
        ]
        if self.auto_join:
            cmd.append("--auto-join")
        if self.nbd:
            cmd += ["--nbd-listen", f"127.0.0.1:{self.nbd_port}"]
        return cmd + list(self.extra)

    def start(self) -> TorusdProcess:
        """Start and wait (bounded) until it listens; RuntimeError with its log on failure."""
        if self.pid is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "torusd.log", "a")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        finally:
            log.close()
        ready = threading.Event()
        want = {"PEER LISTENING"} | ({"NBD LISTENING"} if self.nbd else set())
        seen: set[str] = set()
        proc = self.proc

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.rstrip())
                for w in want:
                    if line.startswith(w):
                        seen.add(w)
                        if w == "PEER LISTENING":
                            self.uuid = line.split()[-1]
                if seen == want:
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(START_TIMEOUT) or seen != want:
            self.kill()
            raise RuntimeError(f"torusd did not start: {self.log_tail()}")
        return self

    def log_tail(self, n: int = 30) -> str:
        """The last lines of its stderr log."""
        try:
            return "\n".join((self.data_dir / "torusd.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL now (a crash) and reap."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (graceful: volumes synced), bounded wait, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> TorusdProcess:
        """Start again on the same data dir and ports."""
        self.stop()
        self.lines = []
        return self.start()


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``...) in KiB; 0 if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` in KiB (0 if it is gone)."""
    return proc_status_kib(pid, "VmHWM")


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
