"""The edge survives abuse (issue 21): buckets per client IP, per anonymous IP and per token
subject, and a ceiling on request bodies. Different client IPs are different loopback source
addresses (127.0.0.x), which the edge sees as they are."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from ops import edge
from ops.stack import Stack
from runtime.access import Role
from runtime.server import MAX_REQUEST_BYTES
from televote.vote.v1 import vote_service_pb2, vote_service_pb2_grpc
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import token

LIMITS = edge.EdgeSettings(jwks_path=None, jwt_issuer="", jwt_audience="")  # type: ignore[arg-type]


def _request(stack: Stack, source: str, method: str, path: str, *, bearer: str | None = None,
             body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(stack.settings.edge_host, stack.edge_port,
                                            timeout=15, source_address=(source, 0))
    headers = {"content-type": "application/json"}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _vote(stack: Stack, source: str, test_round: TestRound, bearer: str) -> int:
    body = json.dumps({"requestId": str(uuid.uuid4()), "roundId": test_round.round_id,
                       "contestantId": test_round.contestants[0], "voteType": "VOTE_TYPE_FREE",
                       "count": 1, "channel": "CHANNEL_WEB"}).encode()
    status, _ = _request(stack, source, "POST", f"/v1/rounds/{test_round.round_id}/votes",
                         bearer=bearer, body=body)
    return status


async def _open_stream(stack: Stack, source: str, path: str,
                       opened: list[asyncio.StreamWriter]) -> int:
    """Open an anonymous SSE stream; an accepted one is kept open (it holds a stream)."""
    reader, writer = await asyncio.open_connection(
        stack.settings.edge_host, stack.edge_port, local_addr=(source, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nhost: edge\r\naccept: text/event-stream\r\n\r\n"
                 .encode())
    status = int((await asyncio.wait_for(reader.readline(), 15)).split()[1])
    if status == 200:
        opened.append(writer)
    else:
        writer.close()
    return status


@pytest.fixture
async def test_round(stack: Stack) -> TestRound:
    return await open_test_round(stack.database_url, stack.redis_url)


async def test_one_ip_opening_ten_thousand_anonymous_streams_is_capped_while_others_vote(
        stack: Stack, test_round: TestRound) -> None:
    path = f"/v1/rounds/{test_round.round_id}/live-results"
    opened: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(64)

    async def attempt() -> int:
        async with gate:
            return await _open_stream(stack, "127.0.0.2", path, opened)

    voter = token(stack, Role.VOTER, f"steady-{uuid.uuid4()}")
    started = time.monotonic()
    try:
        flood = asyncio.gather(*(attempt() for _ in range(10_000)))
        # Meanwhile a voter on another address votes, and every vote counts.
        votes = [await asyncio.to_thread(_vote, stack, "127.0.0.3", test_round, voter)
                 for _ in range(5)]
        statuses = await flood
        elapsed = time.monotonic() - started
    finally:
        for writer in opened:
            writer.close()
    assert votes == [200] * 5
    accepted = statuses.count(200)
    per_second = LIMITS.anonymous_per_ip_per_second
    assert statuses.count(429) > 0
    assert accepted <= 2 * per_second + per_second * elapsed + 10, (accepted, elapsed)
    assert set(statuses) <= {200, 429}


def test_one_voter_flooding_get_results_is_limited_without_slowing_others(
        stack: Stack) -> None:
    flooder = token(stack, Role.VOTER, f"flooder-{uuid.uuid4()}")
    other = token(stack, Role.VOTER, f"other-{uuid.uuid4()}")
    path = f"/v1/rounds/{uuid.uuid4()}/results"  # an unknown round: 404, cheap to answer
    per_second = LIMITS.per_subject_per_second
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(
            lambda _: _request(stack, "127.0.0.4", "GET", path, bearer=flooder)[0],
            range(12 * per_second)))
    elapsed = time.monotonic() - started
    assert set(statuses) <= {404, 429}
    assert statuses.count(404) <= 2 * per_second + per_second * elapsed + 10
    assert 429 in statuses
    # The same address, another voter: answered by the service, not by the limiter.
    assert [_request(stack, "127.0.0.4", "GET", path, bearer=other)[0]
            for _ in range(10)] == [404] * 10


def test_an_oversized_json_body_is_refused_at_the_edge(stack: Stack) -> None:
    voter = token(stack, Role.VOTER, f"big-{uuid.uuid4()}")
    body = json.dumps({"requestId": str(uuid.uuid4()), "roundId": str(uuid.uuid4()),
                       "contestantId": "x" * (LIMITS.max_request_bytes + 1)}).encode()
    status, _ = _request(stack, "127.0.0.5", "POST", f"/v1/rounds/{uuid.uuid4()}/votes",
                         bearer=voter, body=body)
    assert status == 413


async def test_an_oversized_grpc_message_is_refused_at_the_edge_and_by_the_service(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    request = vote_service_pb2.SubmitVoteRequest(request_id=str(uuid.uuid4()),
                                                 round_id="x" * (LIMITS.max_request_bytes + 1))
    metadata = (("authorization", f"Bearer {token(stack, Role.VOTER, 'big')}"),)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await vote_service_pb2_grpc.VoteServiceStub(edge_channel).SubmitVote(
            request, metadata=metadata, timeout=10)
    assert refused.value.code() != grpc.StatusCode.INTERNAL
    # Straight to a service, past the edge: the gRPC server's own ceiling.
    huge = vote_service_pb2.SubmitVoteRequest(round_id="x" * (MAX_REQUEST_BYTES + 1))
    host, port = stack.addresses["vote_svc"][0]
    async with stack.channel("vote_svc", replica_address=(host, port)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await vote_service_pb2_grpc.VoteServiceStub(channel).SubmitVote(huge, timeout=10)
    assert direct.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_edge_keeps_http2_flood_protections_and_an_overload_manager(stack: Stack) -> None:
    text = (stack.settings.state_dir / "envoy.yaml").read_text()
    assert "max_outbound_frames:" not in text  # Envoy's default flood guard
    assert f"max_concurrent_streams: {LIMITS.max_streams_per_connection}" in text
    assert LIMITS.max_streams_per_connection <= 1000
    for needle in ("overload_manager:", "fixed_heap", "global_downstream_max_connections",
                   "request_headers_timeout:", "stream_idle_timeout:", "max_request_bytes:"):
        assert needle in text, needle


