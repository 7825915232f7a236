"""CRC-32 combination and page CRC tables (torus_core.crc32)."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from torus_core.crc32 import _py_crc32_combine, combined_page_crcs, crc32_combine, page_crcs


@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=5000))
def test_combining_two_crcs_gives_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    want = zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == want
    assert _py_crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == want  # without ISA-L


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=20000), page=st.sampled_from([1, 7, 512, 4096]))
def test_a_page_table_combines_to_the_crc_of_the_block(data: bytes, page: int) -> None:
    table = page_crcs(data, page)
    assert len(table) == 4 * -(-len(data) // page)
    assert combined_page_crcs(table, page, len(data)) == zlib.crc32(data)


def test_a_table_with_a_wrong_entry_or_length_does_not_combine_to_the_block_crc() -> None:
    data = bytes(range(256)) * 64
    table = bytearray(page_crcs(data, 4096))
    table[5] ^= 1
    assert combined_page_crcs(table, 4096, len(data)) != zlib.crc32(data)
    assert combined_page_crcs(page_crcs(data, 4096)[:-4], 4096, len(data)) is None
