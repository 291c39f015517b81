"""Conversions between protobuf well-known types / shared enums and what the services store.

Times are stored as timestamptz (datetime, UTC) or as epoch milliseconds (Redis clock); a
channel is stored as its upper-case name (`votes.channel`) and keyed in lower case in the
Redis window and the rounds' offset columns (`keys.CHANNELS`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeAlias

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from televote.vote.v1 import vote_types_pb2

Channel: TypeAlias = vote_types_pb2.Channel.ValueType

#: Channel enum -> stored name (`votes.channel`, fraud facts).
CHANNEL_NAMES: dict[Channel, str] = {vote_types_pb2.CHANNEL_APP: "APP",
                                 vote_types_pb2.CHANNEL_WEB: "WEB",
                                 vote_types_pb2.CHANNEL_SMS: "SMS"}
#: Stored name -> channel enum.
CHANNEL_ENUMS: dict[str, Channel] = {name: number for number, name in CHANNEL_NAMES.items()}
#: Channel enum -> the lower-case key of window fields and offset columns (`keys.CHANNELS`).
CHANNEL_KEYS: dict[Channel, str] = {number: name.lower() for number, name in CHANNEL_NAMES.items()}


def channel_enum(name: str) -> Channel:
    """The enum of a stored channel name; CHANNEL_UNSPECIFIED for one this build does not know."""
    return CHANNEL_ENUMS.get(name, vote_types_pb2.CHANNEL_UNSPECIFIED)


def timestamp(moment: datetime | None) -> Timestamp | None:
    """A Timestamp of a stored time; None (the field stays unset) for no time."""
    if not isinstance(moment, datetime):
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def timestamp_ms(ms: float) -> Timestamp:
    """A Timestamp of epoch milliseconds."""
    stamp = Timestamp()
    stamp.FromMilliseconds(int(ms))
    return stamp


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def datetime_to_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def duration_ms(value: Duration) -> int:
    return value.seconds * 1000 + value.nanos // 1_000_000


def duration(ms: int) -> Duration:
    value = Duration()
    value.FromMilliseconds(ms)
    return value
