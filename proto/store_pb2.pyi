from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRequest(_message.Message):
    __slots__ = ("configs_json",)
    CONFIGS_JSON_FIELD_NUMBER: _ClassVar[int]
    configs_json: str
    def __init__(self, configs_json: _Optional[str] = ...) -> None: ...

class OpenResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tables: _Optional[_Iterable[str]] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("table", "keys", "now")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    now: float
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., now: _Optional[float] = ...) -> None: ...

class RowsResponse(_message.Message):
    __slots__ = ("rows", "found")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    found: bytes
    def __init__(self, rows: _Optional[bytes] = ..., found: _Optional[bytes] = ...) -> None: ...

class GradientsRequest(_message.Message):
    __slots__ = ("table", "keys", "grads", "now")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: bytes
    grads: bytes
    now: float
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., now: _Optional[float] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvictExpiredRequest(_message.Message):
    __slots__ = ("table", "now")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    table: str
    now: float
    def __init__(self, table: _Optional[str] = ..., now: _Optional[float] = ...) -> None: ...

class EvictExpiredResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...

class TableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class DeltaResponse(_message.Message):
    __slots__ = ("keys", "rows", "evicted", "version")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    keys: bytes
    rows: bytes
    evicted: bytes
    version: int
    def __init__(self, keys: _Optional[bytes] = ..., rows: _Optional[bytes] = ..., evicted: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("ids", "bytes", "admissions", "filtered_lookups", "evicted_expired", "evicted_capacity")
    IDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ADMISSIONS_FIELD_NUMBER: _ClassVar[int]
    FILTERED_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ids: int
    bytes: int
    admissions: int
    filtered_lookups: int
    evicted_expired: int
    evicted_capacity: int
    def __init__(self, ids: _Optional[int] = ..., bytes: _Optional[int] = ..., admissions: _Optional[int] = ..., filtered_lookups: _Optional[int] = ..., evicted_expired: _Optional[int] = ..., evicted_capacity: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("directory",)
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    directory: str
    def __init__(self, directory: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DenseRequest(_message.Message):
    __slots__ = ("name", "values", "learning_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: bytes
    learning_rate: float
    def __init__(self, name: _Optional[str] = ..., values: _Optional[bytes] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class DenseResponse(_message.Message):
    __slots__ = ("values", "version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    values: bytes
    version: int
    def __init__(self, values: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...
