"""The item catalogue contract: what a client tells freshrec about an item, and how it travels.

A catalogue change (`PUT /v1/items/{item_id}`, `DELETE ...`) is an `ItemRecord` that the
gateway appends to the event log, keyed by the item (so the changes of one item stay in order
in one partition). The trainer that reads it passes it on in its next sync message, and every
serving replica applies it: a hidden, deleted or expired item leaves every list from that
version on. Deletion is a record too (a tombstone, `deleted`), so a replica that bootstraps
later still knows the item is gone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainer.events import MAX_ID_LENGTH, InvalidEvent

MAX_CATEGORIES = 64
MAX_ATTRIBUTES = 64
RECORD_PREFIX = b'{"catalogue":'
"""Every catalogue record on the log starts with these bytes (an event never does)."""

_FIELDS = frozenset({"attributes", "categories", "hidden", "available_until_ms"})


class InvalidItem(InvalidEvent):
    """An item record failed validation; `field` names what is wrong ("categories[2]")."""


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """What the catalogue holds of one item.

    Args:
        item_id: the client's id of the item.
        attributes: free-form string attributes (brand, language, ...); `filter.attributes`
            matches them exactly.
        categories: the item's categories (`filter.categories` / `exclude_categories`).
        hidden: kept, but served nowhere until a record without it arrives.
        available_until_ms: served nowhere after this time (ms since the epoch); None: always.
        updated_ms: when the gateway accepted the change.
        deleted: a tombstone: the item is gone (served nowhere, not listed, `GET` 404).
    """

    item_id: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    categories: tuple[str, ...] = ()
    hidden: bool = False
    available_until_ms: int | None = None
    updated_ms: int = 0
    deleted: bool = False

    def servable(self, now_ms: int) -> bool:
        """May lists hold the item at `now_ms`?"""
        if self.deleted or self.hidden:
            return False
        return self.available_until_ms is None or now_ms <= self.available_until_ms

    def to_dict(self) -> dict[str, Any]:
        """The public shape (`GET /v1/items/{item_id}`)."""
        return {
            "item_id": self.item_id,
            "attributes": dict(self.attributes),
            "categories": list(self.categories),
            "hidden": self.hidden,
            "available_until_ms": self.available_until_ms,
            "updated_ms": self.updated_ms,
        }

    def to_json(self) -> str:
        body = self.to_dict()
        if self.deleted:
            body = {"item_id": self.item_id, "updated_ms": self.updated_ms, "deleted": True}
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    def to_log(self) -> bytes:
        """The log record (`RECORD_PREFIX` + the record)."""
        return RECORD_PREFIX + self.to_json().encode("utf-8") + b"}"

    @classmethod
    def from_json(cls, text: str | bytes) -> ItemRecord:
        """Decode `to_json` (records this system wrote; raises InvalidItem otherwise)."""
        obj = _json_object(text)
        item_id = _string(obj.get("item_id"), "item_id")
        if obj.get("deleted") is True:
            updated = obj.get("updated_ms", 0)
            return cls(item_id, updated_ms=updated if isinstance(updated, int) else 0, deleted=True)
        updated = obj.get("updated_ms", 0)
        if isinstance(updated, bool) or not isinstance(updated, int):
            raise InvalidItem("updated_ms", "must be an integer")
        body = {k: v for k, v in obj.items() if k not in ("item_id", "updated_ms")}
        return parse_item(item_id, body, updated)

    @classmethod
    def from_log(cls, value: bytes) -> ItemRecord:
        """Decode a log record that starts with `RECORD_PREFIX`."""
        if not value.startswith(RECORD_PREFIX) or not value.endswith(b"}"):
            raise InvalidItem("", "not a catalogue record")
        return cls.from_json(value[len(RECORD_PREFIX) : -1])


def _json_object(text: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidItem("", f"not a JSON object: {type(e).__name__}") from e
    if not isinstance(obj, dict):
        raise InvalidItem("", "not a JSON object")
    return obj


def _attributes(raw: Any) -> dict[str, str]:
    """A client's `attributes` (string to string, at most MAX_ATTRIBUTES), or InvalidItem."""
    attributes = raw or {}
    if not isinstance(attributes, Mapping):
        raise InvalidItem("attributes", f"must be an object, got {type(attributes).__name__}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidItem("attributes", f"must have at most {MAX_ATTRIBUTES} entries")
    for key, value in attributes.items():
        _string(key, "attributes")
        if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
            raise InvalidItem(f"attributes.{key}", f"must be a string of at most {MAX_ID_LENGTH} characters")
    return dict(attributes)


def is_catalogue_record(value: bytes) -> bool:
    return value.startswith(RECORD_PREFIX)


ERASE_PREFIX = b'{"erase_user":'
"""A log record asking the trainer to erase a user (`DELETE /v1/users/{user_id}`)."""


def erase_record(user_id: str) -> bytes:
    """The log record of a user's erasure (keyed by the user: after their earlier events)."""
    return ERASE_PREFIX + json.dumps(validate_user_id(user_id)).encode("utf-8") + b"}"


def is_erase_record(value: bytes) -> bool:
    return value.startswith(ERASE_PREFIX)


def erased_user(value: bytes) -> str:
    """The user id of an erasure record; InvalidItem if it is not one."""
    obj = _json_object(value)
    if set(obj) != {"erase_user"}:
        raise InvalidItem("", "not an erasure record")
    return validate_user_id(obj["erase_user"])


def validate_user_id(user_id: Any) -> str:
    """The user id, or InvalidItem naming `user_id`."""
    return _string(user_id, "user_id")


def _string(raw: Any, name: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidItem(name, f"must be a non-empty string, got {type(raw).__name__}")
    if len(raw) > MAX_ID_LENGTH:
        raise InvalidItem(name, f"must be at most {MAX_ID_LENGTH} characters, got {len(raw)}")
    if not raw.isprintable():
        raise InvalidItem(name, "must contain only printable characters")
    return raw


def validate_item_id(item_id: Any) -> str:
    """The item id, or InvalidItem naming `item_id`."""
    return _string(item_id, "item_id")


def parse_item(item_id: str, obj: Any, updated_ms: int) -> ItemRecord:
    """Validate a client's item body (`attributes`, `categories`, `hidden`,
    `available_until_ms`; all optional) into a record; raises InvalidItem naming the field.

    Example:
        >>> parse_item("i1", {"categories": ["horror"], "hidden": False}, 1).categories
        ('horror',)
    """
    validate_item_id(item_id)
    if not isinstance(obj, Mapping):
        raise InvalidItem("", f"item must be an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise InvalidItem(str(unknown[0])[:64], "unknown field")
    attributes = _attributes(obj.get("attributes"))
    categories = obj.get("categories") or []
    if not isinstance(categories, list):
        raise InvalidItem("categories", f"must be a list of strings, got {type(categories).__name__}")
    if len(categories) > MAX_CATEGORIES:
        raise InvalidItem("categories", f"must have at most {MAX_CATEGORIES} entries")
    cats = tuple(dict.fromkeys(_string(c, f"categories[{n}]") for n, c in enumerate(categories)))
    hidden = obj.get("hidden", False)
    if hidden is None:
        hidden = False
    if not isinstance(hidden, bool):
        raise InvalidItem("hidden", f"must be true or false, got {type(hidden).__name__}")
    until = obj.get("available_until_ms")
    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or not 0 < until < 1 << 53):
        raise InvalidItem("available_until_ms", "must be positive milliseconds since the epoch, or null")
    return ItemRecord(item_id, attributes, cats, hidden, until, updated_ms)


USER_PREFIX = b'{"user_record":'
"""A log record of a user's attributes (`PUT /v1/users/{user_id}`), keyed by the user."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What a client told freshrec about a user: free-form string attributes (a value may
    hold several tokens separated by "|", as event contexts do), and when."""

    user_id: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    updated_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "attributes": dict(self.attributes), "updated_ms": self.updated_ms}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_log(self) -> bytes:
        return USER_PREFIX + self.to_json().encode("utf-8") + b"}"

    @classmethod
    def from_json(cls, text: str | bytes) -> UserRecord:
        obj = _json_object(text)
        updated = obj.get("updated_ms", 0)
        if isinstance(updated, bool) or not isinstance(updated, int):
            raise InvalidItem("updated_ms", "must be an integer")
        return parse_user(obj.get("user_id"), {"attributes": obj.get("attributes")}, updated)

    @classmethod
    def from_log(cls, value: bytes) -> UserRecord:
        if not value.startswith(USER_PREFIX) or not value.endswith(b"}"):
            raise InvalidItem("", "not a user record")
        return cls.from_json(value[len(USER_PREFIX) : -1])


def parse_user(user_id: Any, obj: Any, updated_ms: int) -> UserRecord:
    """Validate a client's user body (`attributes`); raises InvalidItem naming the field."""
    user_id = validate_user_id(user_id)
    if not isinstance(obj, Mapping):
        raise InvalidItem("", f"user must be an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"attributes"})
    if unknown:
        raise InvalidItem(str(unknown[0])[:64], "unknown field")
    attributes = _attributes(obj.get("attributes"))
    return UserRecord(user_id, attributes, updated_ms)
