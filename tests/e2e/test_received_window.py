"""Lines-open is decided by when the edge received a vote, not by when it got through our
queues (issue 22, issue 17 item 5): a vote the edge received before the close that reaches
admission after it (delayed in a queue; here the delay is injected as an edge receive time
before the close on a vote admitted after it) is counted, in the final result and in the
auditor's export; one received after the close is refused VOTING_CLOSED.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc

from ops.stack import Stack
from results_svc import audit
from runtime import keys
from runtime.access import Role
from runtime.gateway_time import RECEIVED_HEADER
from runtime.storage import create_redis
from televote.vote.v1 import vote_gateway_service_pb2, vote_gateway_service_pb2_grpc
from tests.sms_support import carrier_metadata
from tests.support_windows import close_test_round, open_test_round
from tests.vote_support import (
    SMS,
    SMS_TYPE,
    inside,
    new_id,
    query,
    refusal,
    start_replica,
    stop_replica,
    vote_request,
)

#: Long enough for the test's calls after the close to fall inside it on a loaded machine.
LAG_MS = 5000


async def _final_counts(stack: Stack, round_id: str, timeout: float = 60) -> dict[str, int]:
    async with asyncio.timeout(timeout):
        while True:
            rows = await query(stack.database_url,
                               "SELECT counts FROM round_results WHERE round_id = %s", round_id)
            if rows:
                counts: dict[str, Any] = rows[0]["counts"]
                return {contestant: int(n) for contestant, n in counts.items()}
            await asyncio.sleep(0.3)


def _sms_vote(round_id: str, contestant_id: str, user: str, received_ms: int,
              ) -> vote_gateway_service_pb2.GatewayVote:
    """A premium SMS vote as sms_svc forwards it: with the edge's time of the message."""
    vote = vote_gateway_service_pb2.GatewayVote(
        request_id=new_id(), user_id=user, round_id=round_id,
        contestant_id=contestant_id, vote_type=SMS_TYPE, count=1, channel=SMS)
    vote.received_at.FromMilliseconds(received_ms)
    return vote


async def test_a_vote_received_before_the_close_and_admitted_after_it_is_counted(
        stack: Stack, tmp_path: Path) -> None:
    test_round = await open_test_round(stack.database_url, stack.redis_url, contestants=2,
                                       receive_lag_ms=LAG_MS)
    # A replica of our own, on the stack's PostgreSQL and Redis, so the test can present the
    # edge's receive time itself (the delay a queue would have added); its queue-time
    # admission is lifted so an old receive time is not refused as overload first.
    replica = await start_replica(stack.database_url, stack.redis_url, "received-window",
                                  vote_queue_target_ms=60_000.0, vote_queue_budget_ms=60_000.0)
    try:
        closed_ms = await close_test_round(stack.database_url, stack.redis_url, test_round)

        def app_vote(subject: str, received_ms: int) -> Any:
            return replica.votes.SubmitVote(
                vote_request(test_round, contestant=0),
                metadata=(*inside(Role.VOTER, subject), (RECEIVED_HEADER, str(received_ms))),
                timeout=10)

        early = await app_vote("queued-before-close", closed_ms - 300)
        code, reason, _ = await refusal(app_vote("received-after-close", closed_ms + 1))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VOTING_CLOSED")

        sms = inside(Role.INTERNAL, "sms_svc")
        reply = await replica.gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(
            votes=[_sms_vote(test_round.round_id, test_round.contestants[1], "sms:early",
                             closed_ms - 200),
                   _sms_vote(test_round.round_id, test_round.contestants[1], "sms:late",
                             closed_ms + 1)]), metadata=sms, timeout=10)
        counted_sms, closed_sms = reply.results
        assert counted_sms.ok, counted_sms.error
        assert not closed_sms.ok and closed_sms.error.reason == "VOTING_CLOSED"
    finally:
        await stop_replica(replica)

    ledger = await query(stack.database_url,
                         "SELECT vote_id::text, admitted_ms, received_ms FROM votes"
                         " WHERE round_id = %s ORDER BY admitted_ms", test_round.round_id)
    assert {row["vote_id"] for row in ledger} == {early.vote_id, counted_sms.accepted.vote_id}
    # Both were admitted after the close (by the Redis clock) and are judged by when the
    # edge received them.
    assert all(row["admitted_ms"] >= closed_ms for row in ledger)
    assert sorted(row["received_ms"] for row in ledger) == [closed_ms - 300, closed_ms - 200]

    counts = await _final_counts(stack, test_round.round_id)
    assert counts == {test_round.contestants[0]: 1, test_round.contestants[1]: 1}

    out = tmp_path / "ledger.export"
    assert await audit.export_round(stack.database_url, test_round.round_id, out) == 2
    verdict = audit.verify_export(out)
    assert verdict.ok, verdict.problems
    assert verdict.recount is not None and verdict.recount.counts == counts
    header = json.loads(out.read_bytes().split(b"\n", 1)[0])
    assert header["round"]["receive_lag_ms"] == LAG_MS


async def test_a_window_lost_just_after_the_close_is_rebuilt_for_votes_received_before_it(
        stack: Stack) -> None:
    """Redis loses a closed round's window within its receive lag: a vote the edge received
    before the close is still judged by that time, not refused for the missing window."""
    test_round = await open_test_round(stack.database_url, stack.redis_url, contestants=2,
                                       receive_lag_ms=LAG_MS)
    replica = await start_replica(stack.database_url, stack.redis_url, "lost-window",
                                  vote_queue_target_ms=60_000.0, vote_queue_budget_ms=60_000.0)
    try:
        closed_ms = await close_test_round(stack.database_url, stack.redis_url, test_round)
        redis = create_redis(stack.redis_url)
        try:
            await redis.delete(*(keys.window_key(shard, test_round.round_id)
                                 for shard in range(keys.SHARDS)))
        finally:
            await redis.aclose()
        counted = await replica.votes.SubmitVote(
            vote_request(test_round, contestant=0),
            metadata=(*inside(Role.VOTER, "queued-before-the-loss"),
                      (RECEIVED_HEADER, str(closed_ms - 300))), timeout=10)
        code, reason, _ = await refusal(replica.votes.SubmitVote(
            vote_request(test_round, contestant=0),
            metadata=(*inside(Role.VOTER, "received-after-close"),
                      (RECEIVED_HEADER, str(closed_ms + 1))), timeout=10))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VOTING_CLOSED")
    finally:
        await stop_replica(replica)
    assert await query(stack.database_url, "SELECT vote_id::text FROM votes WHERE round_id = %s",
                       test_round.round_id) == [{"vote_id": counted.vote_id}]


async def test_a_gateway_through_the_edge_cannot_move_a_vote_into_the_window(
        stack: Stack, edge_channel: grpc.aio.Channel) -> None:
    """A carrier's own receive time is recorded, but lines-open is judged by when the edge
    received the call: a carrier claiming a time before the close is still closed."""
    test_round = await open_test_round(stack.database_url, stack.redis_url, contestants=2,
                                       receive_lag_ms=LAG_MS)
    closed_ms = await close_test_round(stack.database_url, stack.redis_url, test_round)
    gateway = vote_gateway_service_pb2_grpc.VoteGatewayServiceStub(edge_channel)
    reply = await gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(votes=[
        _sms_vote(test_round.round_id, test_round.contestants[0], "sms:claims-early",
                  closed_ms - 100)]), metadata=carrier_metadata(stack, "smart"), timeout=10)
    (result,) = reply.results
    assert not result.ok and result.error.reason == "VOTING_CLOSED"
