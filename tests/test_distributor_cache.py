"""The bytes-bounded LRU block cache and the peer directory."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from torus_core.distributor import BlockCache, PeerDirectory, ReadLevel, WriteLevel
from torus_core.errors import ConfigError, InvalidArgument
from torus_core.refs import BlockRef

ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "discard"]), st.integers(0, 15), st.integers(1, 40)),
    max_size=80,
)


@given(max_bytes=st.integers(0, 120), script=ops)
def test_cache_matches_an_lru_model_and_never_exceeds_its_byte_limit(
    max_bytes: int, script: list[tuple[str, int, int]]
) -> None:
    cache = BlockCache(max_bytes)
    model: OrderedDict[BlockRef, bytes] = OrderedDict()
    for op, key, size in script:
        ref = BlockRef(1, 1, key)
        if op == "put":
            value = bytes([key]) * size
            if size <= max_bytes:
                model.pop(ref, None)
                model[ref] = value
                while sum(map(len, model.values())) > max_bytes:
                    model.popitem(last=False)
            cache.put(ref, value)
        elif op == "get":
            expected = model.get(ref)
            if expected is not None:
                model.move_to_end(ref)
            assert cache.get(ref) == expected
        else:
            model.pop(ref, None)
            cache.discard(ref)
        assert cache.used_bytes == sum(map(len, model.values())) <= max_bytes
        assert len(cache) == len(model)


def test_cache_counts_hits_and_misses() -> None:
    cache = BlockCache(100)
    ref = BlockRef(1, 2, 3)
    assert cache.get(ref) is None
    cache.put(ref, b"x")
    assert cache.get(ref) == b"x"
    assert (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert ref not in cache and cache.used_bytes == 0


def test_negative_cache_size_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        BlockCache(-1)


def test_peer_directory_update_replace_remove_and_down_marks() -> None:
    dropped: list[str] = []
    d = PeerDirectory({"a": "127.0.0.1:1", "b": "127.0.0.1:2", "client": ""})
    d.on_address_dropped(dropped.append)
    assert d.address("a") == "127.0.0.1:1"
    assert d.address("client") is None  # clients have no address
    assert d.address("zzz") is None
    d.update({"a": "127.0.0.1:9"})
    assert dropped == ["127.0.0.1:1"] and d.address("a") == "127.0.0.1:9"
    d.set_down("b")
    assert d.address("b") is None and d.is_down("b")
    d.set_down("b", False)
    assert d.address("b") == "127.0.0.1:2"
    d.replace({"a": "127.0.0.1:9"})
    assert "b" not in d and len(d) == 1 and dropped[-1] == "127.0.0.1:2"
    d.remove(["a"])
    assert d.snapshot() == {} and dropped[-1] == "127.0.0.1:9"


def test_levels_parse_config_strings_and_reject_unknown_ones() -> None:
    assert WriteLevel.parse("ALL") is WriteLevel.ALL
    assert ReadLevel.parse(" spread ") is ReadLevel.SPREAD
    assert ReadLevel.parse(ReadLevel.SEQ) is ReadLevel.SEQ
    with pytest.raises(ConfigError, match="all, one, local"):
        WriteLevel.parse("quorum")
    with pytest.raises(ConfigError):
        ReadLevel.parse("fast")
