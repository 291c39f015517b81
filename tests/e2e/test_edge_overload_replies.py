"""The edge's own overload refusals read like vote_svc's, for every kind of caller: a vote
refused because its replica already has as many votes in flight as the edge lets through
(votes' circuit breaker, runtime/overload.py) is UNAVAILABLE with ErrorInfo `OVERLOADED` and a
RetryInfo, in grpc-status-details-bin for gRPC callers and as the JSON google.rpc.Status the
transcoder gives vote_svc's own refusals for JSON callers (an HTTP 503 with a plain-text body
was counted as an error by every JSON client, the load test's included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from ops.stack import SERVICES, Stack, StackSettings
from runtime import overload
from runtime.access import Role
from runtime.errors import error_info, retry_delay_ms
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import http, json_reason, new_id, stub, token, vote_request, voter

CALLERS = 24


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def narrow(stack: Stack, tmp_path_factory: pytest.TempPathFactory,
                 ) -> AsyncIterator[Stack]:
    """One vote_svc replica behind an edge that lets one vote through to it at a time, on
    the session's PostgreSQL and Redis (fraud scoring off)."""
    mesh = Stack(StackSettings(
        state_dir=tmp_path_factory.mktemp("narrow-edge"), edge_port=0,
        replicas=dict.fromkeys(SERVICES, 0) | {"vote_svc": 1},
        database_url=stack.database_url, redis_url=stack.redis_url,
        service_env={"FRAUD_TARGET": ""}, edge={"votes_in_flight_per_replica": 1}))
    await mesh.start()
    try:
        yield mesh
    finally:
        await mesh.stop()


def _retry_delay_ms(details: list[dict[str, object]]) -> float:
    (delay,) = [str(detail["retryDelay"]) for detail in details
                if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo")]
    return float(delay.removesuffix("s")) * 1000


async def test_a_json_caller_refused_by_the_edge_gets_the_json_status(narrow: Stack) -> None:
    test_round: TestRound = await open_test_round(narrow.database_url, narrow.redis_url)

    def vote() -> tuple[int, dict[str, object]]:
        return http(narrow, "POST", f"/v1/rounds/{test_round.round_id}/votes",
                    token(narrow, Role.VOTER, f"edge-json-{new_id()}"), {
                        "requestId": new_id(), "roundId": test_round.round_id,
                        "contestantId": test_round.contestants[0],
                        "voteType": "VOTE_TYPE_FREE", "count": 1, "channel": "CHANNEL_WEB"})

    answers = await asyncio.gather(*(asyncio.to_thread(vote) for _ in range(CALLERS)))
    refused = [body for status, body in answers if status != 200]
    assert refused, "no vote was refused: the edge's limit was not reached"
    assert any(status == 200 for status, _ in answers)
    for status, body in answers:
        if status == 200:
            continue
        assert status == 503, body
        assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0], body
        details = body["details"]
        assert isinstance(details, list)
        assert json_reason(body) == "OVERLOADED", body
        assert _retry_delay_ms(details) in overload.EDGE_RETRY_DELAYS_MS


async def test_a_grpc_caller_refused_by_the_edge_gets_overloaded_with_a_retry_delay(
        narrow: Stack) -> None:
    test_round = await open_test_round(narrow.database_url, narrow.redis_url)
    async with grpc.aio.insecure_channel(narrow.edge_target) as channel:
        calls = [stub(channel).SubmitVote(vote_request(test_round),
                                          metadata=voter(narrow, f"edge-grpc-{new_id()}"))
                 for _ in range(CALLERS)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    refused = [answer for answer in answers if isinstance(answer, BaseException)]
    assert refused, "no vote was refused: the edge's limit was not reached"
    for error in refused:
        assert isinstance(error, grpc.aio.AioRpcError), error
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        info = error_info(error)
        assert info is not None and info.reason == "OVERLOADED", error
        assert retry_delay_ms(error) in overload.EDGE_RETRY_DELAYS_MS, error

