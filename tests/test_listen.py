# mypy: allow-untyped-defs
"""Listen addresses of the NBD and metrics listeners: strict ``HOST:PORT`` parsing, a warning
for plaintext on a non-loopback address, and bind failures reported as one-line errors by a real
``torusd`` (no traceback)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from torus_core.daemon.server import parse_listen, warn_if_plaintext
from torus_core.errors import UsageError

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        (":9000", ("127.0.0.1", 9000)),
        ("localhost", ("localhost", 10809)),
        ("[::1]:7", ("::1", 7)),
        ("[::1]", ("::1", 10809)),
        ("node-1.example:0", ("node-1.example", 0)),
    ],
)
def test_listen_addresses_that_parse(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("12345", "bare number"),
        ("127.0.0.1: 80", "bad port"),
        ("127.0.0.1:+80", "bad port"),
        ("127.0.0.1:8_0", "bad port"),
        ("127.0.0.1:99999", "out of range"),
        ("127.0.0.1:000080", "bad port"),
        ("::1:80", "brackets"),
        ("[::1", "expected \\[IPV6\\]:PORT"),
        ("[nothex]:80", "bad IPv6"),
        ("bad host:80", "bad host"),
        ("", "HOST:PORT"),
    ],
)
def test_listen_addresses_that_are_refused_with_a_reason(text, why):
    with pytest.raises(UsageError, match=why):
        parse_listen(text)


def test_plaintext_on_a_non_loopback_address_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="torus_core.daemon.server"):
        assert warn_if_plaintext("NBD", "0.0.0.0", tls=False)
        assert not warn_if_plaintext("NBD", "127.0.0.2", tls=False)
        assert not warn_if_plaintext("NBD", "localhost", tls=False)
        assert not warn_if_plaintext("NBD", "0.0.0.0", tls=True)
    (rec,) = caplog.records
    assert "NBD listens on 0.0.0.0 without TLS" in rec.getMessage()


def _torusd(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORUS_")}
    env["TORUS_METADATA"] = f"sqlite:///{data}/metadata.db"
    return subprocess.run(
        [str(BIN / "torusd"), "--data-dir", str(data), "--size", "16MiB", "--debug-init", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("flag", ["--nbd-listen", "--metrics"])
def test_torusd_bind_failure_is_a_one_line_error(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _torusd(tmp_path, flag, f"127.0.0.1:{port}")
    assert proc.returncode == 1, proc.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torusd_refuses_a_bare_number_as_nbd_address_before_opening_anything(tmp_path):
    proc = _torusd(tmp_path, "--nbd-listen", "12345")
    assert proc.returncode != 0
    assert "bare number" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metadata.db").exists()
