from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetBlockRequest(_message.Message):
    __slots__ = ("ref", "offset", "length", "page_crcs")
    REF_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PAGE_CRCS_FIELD_NUMBER: _ClassVar[int]
    ref: bytes
    offset: int
    length: int
    page_crcs: int
    def __init__(
        self,
        ref: _Optional[bytes] = ...,
        offset: _Optional[int] = ...,
        length: _Optional[int] = ...,
        page_crcs: _Optional[int] = ...,
    ) -> None: ...

class GetBlockResponse(_message.Message):
    __slots__ = ("data", "page_crcs")
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAGE_CRCS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    page_crcs: bytes
    def __init__(self, data: _Optional[bytes] = ..., page_crcs: _Optional[bytes] = ...) -> None: ...

class PutBlocksRequest(_message.Message):
    __slots__ = ("refs", "blocks", "repair", "defer_flush")
    REFS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    DEFER_FLUSH_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedScalarFieldContainer[bytes]
    blocks: _containers.RepeatedScalarFieldContainer[bytes]
    repair: bool
    defer_flush: bool
    def __init__(
        self,
        refs: _Optional[_Iterable[bytes]] = ...,
        blocks: _Optional[_Iterable[bytes]] = ...,
        repair: _Optional[bool] = ...,
        defer_flush: _Optional[bool] = ...,
    ) -> None: ...

class PutBlocksResponse(_message.Message):
    __slots__ = ("written", "boot_id")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    written: int
    boot_id: str
    def __init__(self, written: _Optional[int] = ..., boot_id: _Optional[str] = ...) -> None: ...

class RebalanceCheckRequest(_message.Message):
    __slots__ = ("refs",)
    REFS_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, refs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RebalanceCheckResponse(_message.Message):
    __slots__ = ("has",)
    HAS_FIELD_NUMBER: _ClassVar[int]
    has: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, has: _Optional[_Iterable[bool]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("uuid", "protocol_version", "block_size", "total_blocks", "used_blocks")
    UUID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    protocol_version: int
    block_size: int
    total_blocks: int
    used_blocks: int
    def __init__(
        self,
        uuid: _Optional[str] = ...,
        protocol_version: _Optional[int] = ...,
        block_size: _Optional[int] = ...,
        total_blocks: _Optional[int] = ...,
        used_blocks: _Optional[int] = ...,
    ) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushResponse(_message.Message):
    __slots__ = ("boot_id",)
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    def __init__(self, boot_id: _Optional[str] = ...) -> None: ...

class JournalFenceRequest(_message.Message):
    __slots__ = ("volume_id", "epoch")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    volume_id: int
    epoch: int
    def __init__(self, volume_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class JournalFenceResponse(_message.Message):
    __slots__ = ("last_seq",)
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    def __init__(self, last_seq: _Optional[int] = ...) -> None: ...

class JournalAppendRequest(_message.Message):
    __slots__ = ("volume_id", "epoch", "records")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    volume_id: int
    epoch: int
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(
        self,
        volume_id: _Optional[int] = ...,
        epoch: _Optional[int] = ...,
        records: _Optional[_Iterable[bytes]] = ...,
    ) -> None: ...

class JournalAppendResponse(_message.Message):
    __slots__ = ("last_seq",)
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    def __init__(self, last_seq: _Optional[int] = ...) -> None: ...

class JournalReadRequest(_message.Message):
    __slots__ = ("volume_id", "after_seq")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    volume_id: int
    after_seq: int
    def __init__(self, volume_id: _Optional[int] = ..., after_seq: _Optional[int] = ...) -> None: ...

class JournalReadResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, records: _Optional[_Iterable[bytes]] = ...) -> None: ...

class JournalTrimRequest(_message.Message):
    __slots__ = ("volume_id", "epoch", "through_seq")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    THROUGH_SEQ_FIELD_NUMBER: _ClassVar[int]
    volume_id: int
    epoch: int
    through_seq: int
    def __init__(
        self, volume_id: _Optional[int] = ..., epoch: _Optional[int] = ..., through_seq: _Optional[int] = ...
    ) -> None: ...

class JournalTrimResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...
