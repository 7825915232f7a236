"""Configuration precedence, size parsing and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torus_core.config import load_config
from torus_core.errors import ConfigError, InvalidArgument
from torus_core.units import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512KiB", 512 * 1024),
        ("1GiB", 1 << 30),
        ("2G", 2 * 10**9),
        ("4096", 4096),
        ("1.5MiB", 3 << 19),
        ("10MB", 10**7),
        ("0", 0),
    ],
)
def test_parse_size_accepts_binary_and_si_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "1XB", "1.3B", "G"])
def test_parse_size_rejects_garbage_with_a_typed_error(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["KiB", "MiB", "GiB", "K", "M", "G"]))
def test_parse_size_multiplies_by_the_unit(n: int, unit: str) -> None:
    mult = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "K": 1000, "M": 10**6, "G": 10**9}[unit]
    assert parse_size(f"{n}{unit}") == n * mult


def test_flags_override_env_which_overrides_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "torus.toml"
    cfg_file.write_text(
        'storage_size = "2GiB"\nread_level = "seq"\nwrite_level = "one"\nmetadata = "etcd://127.0.0.1:2379"\n'
        '[tls]\nca_file = "/ca.pem"\n'
    )
    env = {"TORUS_READ_LEVEL": "spread", "TORUS_STORAGE_SIZE": "3GiB"}
    cfg = load_config(cfg_file, overrides={"storage_size": "4G", "write_level": None}, environ=env)
    assert cfg.storage_size == 4 * 10**9  # flag wins
    assert cfg.read_level == "spread"  # env beats file
    assert cfg.write_level == "one"  # file beats default; a None flag is ignored
    assert cfg.metadata_scheme == "etcd"
    assert cfg.tls.ca_file == "/ca.pem"


def test_default_metadata_is_sqlite_inside_the_data_dir(tmp_path: Path) -> None:
    cfg = load_config(overrides={"data_dir": str(tmp_path)}, environ={})
    assert cfg.metadata == f"sqlite:///{tmp_path}/metadata.db"
    assert cfg.metadata_scheme == "sqlite"
    assert cfg.block_store == "file"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nonsense = 1\n", "unknown configuration key 'nonsense'"),
        ('read_level = "fast"\n', "read_level must be one of"),
        ('storage_size = "lots"\n', "storage_size"),
        ('metadata = "localhost:2379"\n', "scheme names the backend"),
        ("[tls]\npassword = 'x'\n", "unknown key"),
        ("[tls]\nca_file = 5\n", r"\[tls\] ca_file must be a file path"),
        ("[tls]\ncert_file = ['a']\n", r"\[tls\] cert_file must be a file path"),
        ("[tls]\nkey_file = ''\n", r"\[tls\] key_file must be a file path"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_config_file_raises_config_error_naming_the_problem(
    tmp_path: Path, content: str, message: str
) -> None:
    cfg_file = tmp_path / "torus.toml"
    cfg_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_file, environ={})


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})
