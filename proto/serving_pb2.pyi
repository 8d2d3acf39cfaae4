from proto import freshrec_pb2 as _freshrec_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Call(_message.Message):
    __slots__ = ("user_id", "k", "exclude_seen", "exclude_items", "categories", "exclude_categories", "attributes", "diversity", "trending_only", "exploration")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    TRENDING_ONLY_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_seen: bool
    exclude_items: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.ScalarMap[str, str]
    diversity: float
    trending_only: bool
    exploration: float
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude_items: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., diversity: _Optional[float] = ..., trending_only: _Optional[bool] = ..., exploration: _Optional[float] = ...) -> None: ...

class CatalogueItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class CataloguePageRequest(_message.Message):
    __slots__ = ("after", "limit")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: str
    limit: int
    def __init__(self, after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class CatalogueResponse(_message.Message):
    __slots__ = ("model_version", "records")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    records: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_version: _Optional[int] = ..., records: _Optional[_Iterable[str]] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[Call]
    def __init__(self, calls: _Optional[_Iterable[_Union[Call, _Mapping]]] = ...) -> None: ...

class CandidatesResponse(_message.Message):
    __slots__ = ("model_version", "items")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    items: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, model_version: _Optional[int] = ..., items: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("calls", "candidates")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[Call]
    candidates: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, calls: _Optional[_Iterable[_Union[Call, _Mapping]]] = ..., candidates: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("recommendations",)
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[_freshrec_pb2.RecommendResponse]
    def __init__(self, recommendations: _Optional[_Iterable[_Union[_freshrec_pb2.RecommendResponse, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("ready", "model_version", "store_age_s")
    READY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    model_version: int
    store_age_s: float
    def __init__(self, ready: _Optional[bool] = ..., model_version: _Optional[int] = ..., store_age_s: _Optional[float] = ...) -> None: ...
