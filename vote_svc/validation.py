"""Request validation: every malformed field is named in a BadRequest, nothing is touched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from runtime import ids
from runtime.errors import FieldViolation
from runtime.protoconv import CHANNEL_NAMES
from televote.vote.v1 import vote_types_pb2
from vote_svc.ingest import VoteRequest

MAX_COUNT = 100
MAX_USER_ID = 128
MAX_DEVICE_ID = 128
MAX_APP_VERSION = 64

_TYPES = {vote_types_pb2.VOTE_TYPE_FREE: "FREE", vote_types_pb2.VOTE_TYPE_PAID: "PAID",
          vote_types_pb2.VOTE_TYPE_PREMIUM_SMS: "PREMIUM_SMS"}



def check_vote(*, request_id: str, user_id: str, round_id: str, contestant_id: str,
               vote_type: int, count: int, channel: int,
               client: vote_types_pb2.ClientMetadata | None, has_client: bool, ip: str,
               gateway: bool, prefix: str = "", received_at: datetime | None = None,
               ) -> tuple[VoteRequest | None, list[FieldViolation]]:
    """A VoteRequest, or the list of what is wrong with the fields."""
    bad: list[FieldViolation] = []

    def violation(name: str, description: str) -> None:
        bad.append(FieldViolation(prefix + name, description))

    request_uuid = ids.canonical(request_id)
    round_uuid = ids.canonical(round_id)
    contestant_uuid = ids.canonical(contestant_id)
    if request_uuid is None:
        violation("request_id", "must be a UUID")
    if not user_id:
        violation("user_id", "is required")
    elif len(user_id) > MAX_USER_ID or any(c.isspace() or c in "{}" for c in user_id):
        violation("user_id", f"at most {MAX_USER_ID} characters, no spaces or braces")
    if round_uuid is None:
        violation("round_id", "must be a round id (UUID)")
    if contestant_uuid is None:
        violation("contestant_id", "must be a contestant id (UUID)")
    type_name = _TYPES.get(vote_type)  # type: ignore[call-overload]
    channel_name = CHANNEL_NAMES.get(channel)  # type: ignore[call-overload]
    if type_name is None:
        violation("vote_type", "must be FREE or PAID" + (" or PREMIUM_SMS" if gateway else ""))
    elif type_name == "PREMIUM_SMS" and not gateway:
        violation("vote_type", "PREMIUM_SMS votes come only through VoteGatewayService")
    if channel_name is None:
        violation("channel", "must be APP or WEB" + (" or SMS" if gateway else ""))
    elif channel_name == "SMS" and not gateway:
        violation("channel", "SMS votes come only through VoteGatewayService")
    if type_name is not None and channel_name is not None and gateway and (
            (type_name == "PREMIUM_SMS") != (channel_name == "SMS")):
        violation("vote_type", "PREMIUM_SMS goes with channel SMS, and only with it")
    if not 1 <= count <= MAX_COUNT:
        violation("count", f"must be 1 to {MAX_COUNT}")
    elif type_name == "PREMIUM_SMS" and count != 1:
        violation("count", "an SMS vote is always 1")
    latitude = longitude = None
    accuracy = 0.0
    device_id = app_version = ""
    client_time = None
    if client is not None and has_client:
        device_id, app_version = client.device_id, client.app_version
        if len(device_id) > MAX_DEVICE_ID:
            violation("client.device_id", f"at most {MAX_DEVICE_ID} characters")
        if len(app_version) > MAX_APP_VERSION:
            violation("client.app_version", f"at most {MAX_APP_VERSION} characters")
        if client.HasField("location"):
            location = client.location
            if not (math.isfinite(location.latitude) and -90 <= location.latitude <= 90):
                violation("client.location.latitude", "must be -90 to 90")
            if not (math.isfinite(location.longitude) and -180 <= location.longitude <= 180):
                violation("client.location.longitude", "must be -180 to 180")
            if not (math.isfinite(location.accuracy_meters) and location.accuracy_meters >= 0):
                violation("client.location.accuracy_meters", "must be 0 or more")
            latitude, longitude = location.latitude, location.longitude
            accuracy = location.accuracy_meters
        if client.HasField("client_time"):
            client_time = client.client_time
    if bad:
        return None, bad
    assert type_name is not None and channel_name is not None
    assert request_uuid is not None and round_uuid is not None and contestant_uuid is not None
    return VoteRequest(
        request_id=request_uuid, user_id=user_id, round_id=round_uuid,
        contestant_id=contestant_uuid,
        vote_type=type_name, count=count, channel=channel_name, device_id=device_id,
        app_version=app_version, latitude=latitude, longitude=longitude, accuracy=accuracy,
        ip=ip, client_time=client_time, received_at=received_at), []


def client_ip(metadata: Sequence[tuple[str, str | bytes]] | None, peer: str) -> str:
    """The caller's IP as the edge judged it (`x-televote-client-ip`, which the edge always
    overwrites: envoy/edge.yaml), else the peer (a caller inside the mesh).

    Never from the request body or a client's X-Forwarded-For: a client could put anything
    there.
    """
    for key, value in metadata or ():
        if key == "x-televote-client-ip" and isinstance(value, str) and value:
            return value
    # peer looks like "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


def timestamp_to_datetime(seconds: int, nanos: int) -> datetime:
    return datetime.fromtimestamp(seconds + nanos / 1e9, UTC)
