"""INode encoding (cross-checked against the protobuf runtime) and the INode store."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st
from torus_blockstore_mem.store import MemBlockStore

from torus_core.errors import BlockExists, BlockNotExist, CorruptBlock, InvalidArgument
from torus_core.inode import INode, INodeStore, virtual_inode
from torus_core.refs import BlockRef, BlockType, INodeRef


def _models_inode_class() -> Any:
    """Build models.INode / models.BlockLayer from the original .proto field numbers."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="torus_test_models.proto", package="models", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto
    layer = fdp.message_type.add(name="BlockLayer")
    layer.field.add(name="type", number=1, type=F.TYPE_UINT32, label=F.LABEL_OPTIONAL)
    layer.field.add(name="content", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="INode")
    msg.field.add(name="volume", number=1, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    msg.field.add(name="inode", number=2, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    msg.field.add(name="filesize", number=4, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    entry = msg.nested_type.add(name="AttrsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    msg.field.add(
        name="attrs",
        number=7,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".models.INode.AttrsEntry",
    )
    msg.field.add(
        name="blocks", number=8, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".models.BlockLayer"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("models.INode"))


PB_INODE = _models_inode_class()

inodes = st.builds(
    INode,
    volume=st.integers(0, 2**40 - 1),
    inode=st.integers(0, 2**64 - 1),
    filesize=st.integers(0, 2**64 - 1),
    attrs=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    blocks=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=100)), max_size=4),
)


@given(inode=inodes)
def test_inode_encoding_is_the_models_inode_protobuf(inode: INode) -> None:
    raw = inode.to_bytes()
    pb = PB_INODE()
    pb.ParseFromString(raw)
    assert (pb.volume, pb.inode, pb.filesize) == (inode.volume, inode.inode, inode.filesize)
    assert dict(pb.attrs) == inode.attrs
    assert [(b.type, b.content) for b in pb.blocks] == inode.blocks
    assert INode.from_bytes(pb.SerializeToString(deterministic=True)) == inode
    assert INode.from_bytes(raw) == inode


@given(data=st.binary(max_size=60))
def test_garbage_inode_bytes_raise_invalid_argument_or_decode(data: bytes) -> None:
    try:
        INode.from_bytes(data)
    except InvalidArgument:
        pass


@pytest.mark.parametrize("payload", [0, 10, 200, 1000])
def test_inode_store_round_trips_over_one_or_more_blocks(payload: int) -> None:
    store = MemBlockStore(64, 1000)
    istore = INodeStore(store)
    inode = INode(7, 42, 123, {"k": "v"}, [(1, b"\x01" * payload), (0, b"")])
    ref = istore.write_inode(inode)
    assert ref == INodeRef(7, 42)
    assert istore.get_inode(ref) == inode
    refs = sorted(store.iter_refs())
    framed_len = 4 + len(inode.to_bytes())
    assert refs == [BlockRef(7, 42, n, BlockType.INODE) for n in range(1, -(-framed_len // 64) + 1)]
    first = store.get_block(refs[0])
    assert int.from_bytes(first[:4], "little") == framed_len - 4
    istore.delete_inode(ref)
    assert store.used_blocks() == 0
    with pytest.raises(BlockNotExist):
        istore.get_inode(ref)


def test_rewriting_an_inode_with_other_content_is_refused() -> None:
    istore = INodeStore(MemBlockStore(64, 100))
    istore.write_inode(INode(1, 5, 10))
    istore.write_inode(INode(1, 5, 10))  # identical: no-op
    with pytest.raises(BlockExists):
        istore.write_inode(INode(1, 5, 11))


def test_inode_stored_under_a_foreign_ref_is_corrupt() -> None:
    store = MemBlockStore(64, 100)
    payload = INode(1, 6, 10).to_bytes()
    store.write_block(BlockRef(1, 5, 1, BlockType.INODE), len(payload).to_bytes(4, "little") + payload)
    with pytest.raises(CorruptBlock):
        INodeStore(store).get_inode(INodeRef(1, 5))


def test_inode_one_is_virtual_and_never_stored() -> None:
    istore = INodeStore(MemBlockStore(64, 100))
    v = virtual_inode(3, 4096)
    assert (v.ref, v.filesize, v.blocks) == (INodeRef(3, 1), 4096, [])
    with pytest.raises(InvalidArgument):
        istore.write_inode(v)
    with pytest.raises(InvalidArgument):
        istore.get_inode(INodeRef(3, 1))
