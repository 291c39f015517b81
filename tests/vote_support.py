"""Helpers shared by the vote tests: calling vote_svc, reading the ledger and Redis."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
from psycopg.rows import dict_row

from ops.stack import Stack
from results_svc import judging
from runtime import keys
from runtime.access import Principal, Role
from runtime.errors import error_info
from runtime.server import ServiceHost
from runtime.storage import create_redis
from televote.vote.v1 import (
    vote_gateway_service_pb2_grpc,
    vote_service_pb2,
    vote_service_pb2_grpc,
    vote_types_pb2,
    wallet_admin_service_pb2_grpc,
)
from tests.conftest import bearer
from tests.support_windows import TestRound
from vote_svc.config import VoteConfig
from vote_svc.server import create_server

FREE = vote_types_pb2.VOTE_TYPE_FREE
PAID = vote_types_pb2.VOTE_TYPE_PAID
SMS_TYPE = vote_types_pb2.VOTE_TYPE_PREMIUM_SMS
APP = vote_types_pb2.CHANNEL_APP
WEB = vote_types_pb2.CHANNEL_WEB
SMS = vote_types_pb2.CHANNEL_SMS


#: SQL: the time a ledger row `v` of round `r` is judged by (results_svc.rules.judged_ms), and
#: the round's open and close in the same ms, for tests that check the window in the ledger.
JUDGED_MS = judging.judged_ms("v").replace("%(lag)s", "r.receive_lag_ms")
OPENS_MS = "floor(extract(epoch FROM r.opens_at) * 1000)"
CLOSED_MS = "floor(extract(epoch FROM r.closed_at) * 1000)"


def new_id() -> str:
    return str(uuid.uuid4())


def voter(stack: Stack, subject: str) -> tuple[tuple[str, str]]:
    """Edge metadata of a voter."""
    return bearer(stack.settings.state_dir, Role.VOTER, subject)


def inside(role: Role, subject: str) -> tuple[tuple[str, str], ...]:
    """Metadata for calling a vote_svc replica directly, as the mesh does."""
    return Principal(role, subject).to_metadata()


def vote_request(test_round: TestRound, *, contestant: int = 0, vote_type: int = FREE,
                 count: int = 1, channel: int = APP, request_id: str | None = None,
                 ) -> vote_service_pb2.SubmitVoteRequest:
    return vote_service_pb2.SubmitVoteRequest(
        request_id=request_id or new_id(), round_id=test_round.round_id,
        contestant_id=test_round.contestants[contestant], vote_type=vote_type,  # type: ignore[arg-type]
        count=count, channel=channel,  # type: ignore[arg-type]
        client=vote_types_pb2.ClientMetadata(device_id=f"device-{new_id()}",
                                             app_version="ios/3.4.1"))


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """The status code, reason and ErrorInfo metadata of a call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        assert info is not None, error
        return error.code(), info.reason, dict(info.metadata)
    raise AssertionError("the call succeeded")


def stub(channel: grpc.aio.Channel) -> vote_service_pb2_grpc.VoteServiceStub:
    return vote_service_pb2_grpc.VoteServiceStub(channel)


def http(stack: Stack, method: str, path: str, token: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack.edge_url}{path}", data=data, method=method,
                                     headers=headers or {})
    request.add_header("content-type", "application/json")
    request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def token(stack: Stack, role: Role, subject: str) -> str:
    return bearer(stack.settings.state_dir, role, subject)[0][1].removeprefix("Bearer ")


def json_reason(body: dict[str, Any]) -> str:
    for detail in body.get("details", []):
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


async def query(database_url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url,
                                                     row_factory=dict_row) as connection:
        cursor = await connection.execute(sql, args)
        return await cursor.fetchall()


async def ledger_rows(database_url: str, round_id: str) -> list[dict[str, Any]]:
    return await query(database_url, "SELECT * FROM votes WHERE round_id = %s", round_id)


async def state_of(database_url: str, redis_url: str, user_id: str,
                   test_round: TestRound) -> dict[str, Any]:
    """Everything a vote could change, for "nothing changed" assertions."""
    shard = keys.shard_of(user_id)
    redis = create_redis(redis_url)
    try:
        user = await redis.hgetall(keys.user_key(shard, user_id))
        live = await redis.hgetall(keys.live_key(shard, test_round.round_id))
        minutes = await redis.hgetall(keys.live_minutes_key(shard, test_round.round_id))
        rate = await redis.hget(keys.rate_key(shard, user_id), "n")
        idem = sorted(await redis.keys(f"tv:{keys.tag(shard)}:idem:{user_id}:*"))
    finally:
        await redis.aclose()
    # The Redis user hash is a cache: compare what it means (balance, free votes used), with
    # PostgreSQL's value where it is not loaded (a refusal may load it; that changes nothing).
    wallet = await query(database_url, "SELECT credited - spent - clawed_back AS paid"
                         " FROM wallets WHERE user_id = %s", user_id)
    free = await query(database_url, "SELECT used FROM free_vote_usage WHERE user_id = %s"
                       " AND episode_id = %s", user_id, test_round.episode_id)
    fields = {key.decode(): int(value) for key, value in user.items()}
    effective = {
        "paid": (fields["credited"] - fields["spent"] if "credited" in fields
                 else (wallet[0]["paid"] if wallet else 0)),
        "free_used": fields.get(f"free:{test_round.episode_id}",
                                free[0]["used"] if free else 0),
        "round_free_used": fields.get(f"rfree:{test_round.round_id}", 0),
    }
    return {
        "votes": await query(database_url, "SELECT vote_id FROM votes WHERE user_id = %s"
                             " ORDER BY vote_id", user_id),
        "tallies": await query(database_url, "SELECT * FROM round_tallies WHERE round_id = %s"
                               " ORDER BY contestant_id, vote_type, channel, slot",
                               test_round.round_id),
        "free": await query(database_url, "SELECT * FROM free_vote_usage WHERE user_id = %s",
                            user_id),
        "wallet": await query(database_url, "SELECT * FROM wallets WHERE user_id = %s",
                              user_id),
        "redis_user": effective, "live": live, "minutes": minutes, "rate": rate, "idem": idem,
    }


@dataclass
class Replica:
    host: ServiceHost
    channel: grpc.aio.Channel

    @property
    def votes(self) -> vote_service_pb2_grpc.VoteServiceStub:
        return vote_service_pb2_grpc.VoteServiceStub(self.channel)

    @property
    def gateway(self) -> vote_gateway_service_pb2_grpc.VoteGatewayServiceStub:
        return vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(self.channel)

    @property
    def wallet(self) -> wallet_admin_service_pb2_grpc.WalletAdminServiceStub:
        return wallet_admin_service_pb2_grpc.WalletAdminServiceStub(self.channel)


async def start_replica(database_url: str, redis_url: str, name: str,
                        **settings: Any) -> Replica:
    settings.setdefault("fraud_target", "")
    config = VoteConfig(database_url=database_url, redis_url=redis_url, televote_port=0,
                        televote_replica=name, televote_grace_seconds=2,
                        televote_drain_announce_seconds=0,
                        vote_pseudonym_salt="concurrency-test-salt",
                        vote_ip_hash_key="concurrency-test-key", **settings)
    host, port = create_server(config)
    await host.start()
    return Replica(host, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))


async def stop_replica(replica: Replica) -> None:
    await replica.channel.close()
    await replica.host.stop()


async def early_in_a_minute(margin_s: float = 10.0) -> None:
    """Wait, if needed, until at least `margin_s` of the current clock minute is left.

    Rate limits count votes per clock minute (of the Redis server: this machine's clock), so a
    test that fills the limit and then expects a refusal must make its calls in one minute.
    """
    into_minute_s = time.time() % 60
    if into_minute_s > 60 - margin_s:
        await asyncio.sleep(60.1 - into_minute_s)
