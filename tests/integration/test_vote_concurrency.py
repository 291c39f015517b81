"""Admission under concurrency, across replicas: quotas, balances, idempotency, windows,
gateway batches and fraud verdicts (invariants 2-4).

Two vote_svc replicas run in this process against the session stack's PostgreSQL and Redis,
without fraud scoring (so that fraud_svc's velocity and timing signals cannot step into tests
of admission rules); fraud verdicts are tested with a scorer that answers what the test says.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio

from ops.stack import Stack
from runtime import keys
from runtime.access import Role
from runtime.storage import create_redis
from televote.fraud.v1 import (
    fraud_scoring_service_pb2,
    fraud_scoring_service_pb2_grpc,
    fraud_types_pb2,
)
from televote.vote.v1 import (
    vote_gateway_service_pb2,
    wallet_admin_service_pb2,
)
from tests.support_windows import TestRound, open_test_round
from tests.vote_support import (
    PAID,
    SMS,
    SMS_TYPE,
    Replica,
    early_in_a_minute,
    inside,
    ledger_rows,
    new_id,
    query,
    refusal,
    start_replica,
    stop_replica,
    vote_request,
)

#: The defaults, and the option for unary votes (vote_svc/config.py,
#: vote_admit_max_inflight): batches that leave when the one out returns instead of on a
#: timer. Every invariant below holds under both.
BATCHING: dict[str, dict[str, Any]] = {
    "timed": {},
    "smart": {"vote_admit_wait_ms": 0, "vote_admit_max_inflight": 1,
              "vote_batch_interval_ms": 0, "vote_max_inflight_batches": 1},
}


@pytest_asyncio.fixture(scope="module", params=list(BATCHING))
async def replicas(stack: Stack, request: pytest.FixtureRequest,
                   ) -> AsyncIterator[list[Replica]]:
    pair = [await start_replica(stack.database_url, stack.redis_url, name,
                                **BATCHING[request.param]) for name in "ab"]
    yield pair
    for replica in pair:
        await stop_replica(replica)


async def _round(stack: Stack, **options: Any) -> TestRound:
    return await open_test_round(stack.database_url, stack.redis_url, **options)


async def _outcomes(calls: list[Any]) -> tuple[list[Any], Counter[str]]:
    """Replies of the calls that succeeded, and a count of refusal reasons."""
    replies: list[Any] = []
    reasons: Counter[str] = Counter()

    async def one(call: Any) -> None:
        try:
            replies.append(await call)
        except grpc.aio.AioRpcError:
            _, reason, _ = await refusal(_reraise(call))
            reasons[reason] += 1
    await asyncio.gather(*(one(call) for call in calls))
    return replies, reasons


async def _reraise(call: Any) -> Any:
    return await call


async def test_1000_concurrent_free_votes_of_one_user_accept_exactly_the_quota(
        stack: Stack, replicas: list[Replica]) -> None:
    test_round = await _round(stack, rate_limit=10_000)
    user = f"greedy-{new_id()[:8]}"
    calls = [replicas[i % 2].votes.SubmitVote(vote_request(test_round, contestant=i % 3),
                                              metadata=inside(Role.VOTER, user), timeout=60)
             for i in range(1000)]
    replies, reasons = await _outcomes(calls)
    assert len(replies) == 5
    assert reasons == Counter({"NO_FREE_VOTES": 995})
    assert sorted(reply.free_votes_left for reply in replies) == [0, 1, 2, 3, 4]
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    assert len(rows) == 5 and {row["user_id"] for row in rows} == {user}
    usage = await query(stack.database_url, "SELECT used FROM free_vote_usage WHERE"
                        " user_id = %s", user)
    assert usage == [{"used": 5}]


async def test_concurrent_paid_votes_never_overspend(
        stack: Stack, replicas: list[Replica]) -> None:
    test_round = await _round(stack, rate_limit=10_000)
    user = f"spender-{new_id()[:8]}"
    granted = await replicas[0].wallet.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
        request_id=new_id(), user_id=user, count=50, reason="promotion"),
        metadata=inside(Role.OPERATOR, "producer"), timeout=10)
    assert granted.paid_balance == 50 and granted.granted_by == "producer"
    counts = [random.randint(1, 3) for _ in range(300)]
    calls = [replicas[i % 2].votes.SubmitVote(
        vote_request(test_round, vote_type=PAID, count=count),
        metadata=inside(Role.VOTER, user), timeout=60) for i, count in enumerate(counts)]
    replies, reasons = await _outcomes(calls)
    assert set(reasons) <= {"INSUFFICIENT_BALANCE"}
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    spent = sum(row["count"] for row in rows)
    assert 50 - 2 <= spent <= 50  # at most 2 left that no 3-vote request could spend
    assert len(rows) == len(replies)
    assert min(reply.paid_balance for reply in replies) == 50 - spent >= 0
    (wallet,) = await query(stack.database_url, "SELECT credited, spent FROM wallets"
                            " WHERE user_id = %s", user)
    assert wallet == {"credited": 50, "spent": spent}
    audit = await query(stack.database_url, "SELECT actor_subject FROM audit_log"
                        " WHERE action = 'wallet.grant' AND target = %s", f"user:{user}")
    assert audit == [{"actor_subject": "producer"}]


async def test_200_concurrent_retries_across_two_replicas_make_one_row(
        stack: Stack, replicas: list[Replica]) -> None:
    test_round = await _round(stack)
    user = f"retrier-{new_id()[:8]}"
    request = vote_request(test_round)
    calls = [replicas[i % 2].votes.SubmitVote(request, metadata=inside(Role.VOTER, user),
                                              timeout=60) for i in range(200)]
    replies, reasons = await _outcomes(calls)
    assert not reasons
    assert len({reply.vote_id for reply in replies}) == 1
    assert len({reply.receipt_hash for reply in replies}) == 1
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    assert len(rows) == 1 and str(rows[0]["vote_id"]) == replies[0].vote_id


async def test_grants_are_idempotent_and_a_changed_retry_is_refused(
        stack: Stack, replicas: list[Replica]) -> None:
    user, request_id = f"granted-{new_id()[:8]}", new_id()
    grant = wallet_admin_service_pb2.GrantVotesRequest(
        request_id=request_id, user_id=user, count=7, reason="ticket 42")
    operator = inside(Role.OPERATOR, "support")
    replies = await asyncio.gather(*(replicas[i % 2].wallet.GrantVotes(
        grant, metadata=operator, timeout=10) for i in range(10)))
    assert len({reply.grant_id for reply in replies}) == 1
    assert {reply.paid_balance for reply in replies} == {7}
    grant.count = 8
    code, reason, _ = await refusal(replicas[0].wallet.GrantVotes(grant, metadata=operator,
                                                                  timeout=10))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_MISMATCH")
    (wallet,) = await query(stack.database_url, "SELECT credited FROM wallets WHERE"
                            " user_id = %s", user)
    assert wallet["credited"] == 7


async def _hammer(stack: Stack, replicas: list[Replica], test_round: TestRound,
                  until_ms: int) -> list[tuple[str, int, str]]:
    """Votes from fresh users as fast as possible until `until_ms` (Redis clock); returns
    (outcome, Redis time after the reply, reason) for each."""
    redis = create_redis(stack.redis_url)
    seen: list[tuple[str, int, str]] = []

    async def worker(number: int) -> None:
        index = 0
        while await keys.server_time_ms(redis) < until_ms:
            index += 1
            call = replicas[number % 2].votes.SubmitVote(
                vote_request(test_round), metadata=inside(Role.VOTER, f"edge-{number}-{index}"),
                timeout=10)
            try:
                await call
                seen.append(("ok", await keys.server_time_ms(redis), ""))
            except grpc.aio.AioRpcError:
                _, reason, _ = await refusal(_reraise(call))
                seen.append(("refused", await keys.server_time_ms(redis), reason))
    try:
        await asyncio.gather(*(worker(number) for number in range(8)))
    finally:
        await redis.aclose()
    return seen


async def test_no_vote_is_accepted_before_the_window_opens(
        stack: Stack, replicas: list[Replica]) -> None:
    # Votes for 1.5 s before the opening and 1 s after: on a busy machine (or a Redis Cluster)
    # a voter's first vote can take half a second, and each of these is a first vote.
    test_round = await _round(stack, opens_in_ms=1500)
    seen = await _hammer(stack, replicas, test_round, test_round.opens_at_ms + 1000)
    assert any(reason == "VOTING_NOT_OPEN" for _, _, reason in seen)
    assert any(outcome == "ok" for outcome, _, _ in seen)
    for outcome, _, reason in seen:
        if outcome == "refused":
            assert reason == "VOTING_NOT_OPEN"
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    assert rows and min(row["admitted_ms"] for row in rows) >= test_round.opens_at_ms


async def test_no_vote_is_accepted_at_or_after_the_close(
        stack: Stack, replicas: list[Replica]) -> None:
    # Open since a second ago, closing 1.4 s from now: time for first votes (a PostgreSQL
    # read each, and on a Redis Cluster more client work) to be acknowledged before the close
    # on a busy machine.
    test_round = await _round(stack, duration_ms=2400)
    seen = await _hammer(stack, replicas, test_round, test_round.closes_at_ms + 300)
    assert any(outcome == "ok" for outcome, _, _ in seen)
    closed = [replied for outcome, replied, reason in seen if reason == "VOTING_CLOSED"]
    assert closed and all(replied >= test_round.closes_at_ms for replied in closed)
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    assert max(row["admitted_ms"] for row in rows) < test_round.closes_at_ms
    # Every vote that replied OK was admitted before the close. (When its answer arrived says
    # nothing more: a vote admitted just before the close may wait for its ledger commit.)
    assert len(rows) == sum(1 for outcome, _, _ in seen if outcome == "ok")


async def test_a_vote_one_millisecond_after_the_close_is_refused(
        stack: Stack, replicas: list[Replica]) -> None:
    test_round = await _round(stack, opens_in_ms=-10_000, duration_ms=9_999)  # closed 1 ms ago
    code, reason, _ = await refusal(replicas[0].votes.SubmitVote(
        vote_request(test_round), metadata=inside(Role.VOTER, "late"), timeout=10))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VOTING_CLOSED")
    sms_grace = await _round(stack, opens_in_ms=-10_000, duration_ms=9_999,
                             offsets={"sms": 60_000})
    reply = await replicas[0].gateway.SubmitVotes(vote_gateway_service_pb2.SubmitVotesRequest(
        votes=[vote_gateway_service_pb2.GatewayVote(
            request_id=new_id(), user_id="sms:+85512000001", round_id=sms_grace.round_id,
            contestant_id=sms_grace.contestants[0], vote_type=SMS_TYPE, count=1,
            channel=SMS)]), metadata=inside(Role.INTERNAL, "sms_svc"), timeout=10)
    assert reply.results[0].ok, reply  # the SMS channel closes later than the app
    assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 0


async def test_a_gateway_batch_is_admitted_vote_by_vote_and_retried_whole(
        stack: Stack, replicas: list[Replica]) -> None:
    test_round = await _round(stack)
    votes = [vote_gateway_service_pb2.GatewayVote(
        request_id=new_id(), user_id=f"sms:+855{10_000_000 + i}", round_id=test_round.round_id,
        contestant_id=test_round.contestants[i % 3], vote_type=SMS_TYPE, count=1, channel=SMS)
        for i in range(998)]
    votes.append(vote_gateway_service_pb2.GatewayVote(
        request_id="bad", user_id="sms:+85599", round_id=test_round.round_id,
        contestant_id=test_round.contestants[0], vote_type=SMS_TYPE, count=1, channel=SMS))
    votes.append(vote_gateway_service_pb2.GatewayVote(
        request_id=new_id(), user_id="sms:+85598", round_id=test_round.round_id,
        contestant_id=new_id(), vote_type=SMS_TYPE, count=1, channel=SMS))
    request = vote_gateway_service_pb2.SubmitVotesRequest(votes=votes)
    gateway = inside(Role.CARRIER, "smart")
    first = await replicas[0].gateway.SubmitVotes(request, metadata=gateway, timeout=60)
    assert [result.index for result in first.results] == list(range(1000))
    assert all(result.ok for result in first.results[:998])
    assert first.results[998].error.reason == "INVALID_REQUEST"
    assert first.results[999].error.reason == "INVALID_CONTESTANT"
    again = await replicas[1].gateway.SubmitVotes(request, metadata=gateway, timeout=60)
    assert [r.accepted.vote_id for r in again.results] == [r.accepted.vote_id
                                                            for r in first.results]
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    assert len(rows) == 998 and {row["vote_type"] for row in rows} == {"PREMIUM_SMS"}
    tallies = await query(stack.database_url, "SELECT sum(votes) AS n FROM round_tallies"
                          " WHERE round_id = %s", test_round.round_id)
    assert tallies[0]["n"] == 998
    too_many = vote_gateway_service_pb2.SubmitVotesRequest(votes=votes + votes[:1])
    code, reason, _ = await refusal(replicas[0].gateway.SubmitVotes(too_many, metadata=gateway,
                                                                    timeout=10))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    code, reason, _ = await refusal(replicas[0].gateway.SubmitVotes(
        vote_gateway_service_pb2.SubmitVotesRequest(), metadata=gateway, timeout=10))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


async def test_a_premium_sms_neither_reads_nor_reports_the_subscribers_wallet(
        stack: Stack, replicas: list[Replica]) -> None:
    """Its carrier charges a premium SMS: it takes no free vote and no paid vote, so its
    admission needs no cache of the subscriber's wallet (no PostgreSQL read, no second
    admission) and it answers 0 for both. The same user's app votes still see theirs."""
    test_round = await _round(stack)
    user = f"sms:+855{random.randrange(10**8, 10**9)}"
    await replicas[0].wallet.GrantVotes(wallet_admin_service_pb2.GrantVotesRequest(
        request_id=new_id(), user_id=user, count=3, reason="test credit"),
        metadata=inside(Role.OPERATOR, "producer"), timeout=10)
    sms = vote_gateway_service_pb2.SubmitVotesRequest(votes=[
        vote_gateway_service_pb2.GatewayVote(
            request_id=new_id(), user_id=user, round_id=test_round.round_id,
            contestant_id=test_round.contestants[0], vote_type=SMS_TYPE, count=1,
            channel=SMS)])
    reply = await replicas[0].gateway.SubmitVotes(sms, metadata=inside(Role.CARRIER, "smart"),
                                                  timeout=10)
    accepted = reply.results[0].accepted
    assert accepted.vote_id and (accepted.free_votes_left, accepted.paid_balance) == (0, 0)
    redis = create_redis(stack.redis_url)
    try:
        assert not await redis.exists(keys.user_key(keys.shard_of(user), user))
    finally:
        await redis.aclose()
    app = await replicas[1].votes.SubmitVote(vote_request(test_round),
                                             metadata=inside(Role.VOTER, user), timeout=10)
    assert (app.free_votes_left, app.paid_balance) == (4, 3)
    assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 2


class _Scorer(fraud_scoring_service_pb2_grpc.FraudScoringServiceServicer):
    """Answers each vote with the action `decide(vote)` gives; or fails like a down scorer."""

    def __init__(self, decide: Callable[[fraud_scoring_service_pb2.VoteFacts], int]) -> None:
        self.decide = decide
        self.calls: list[int] = []

    def _scores(self, votes: Any) -> list[fraud_scoring_service_pb2.VoteScore]:
        self.calls.append(len(votes))
        return [fraud_scoring_service_pb2.VoteScore(ref=vote.ref, action=self.decide(vote),
                                                    score=0.6, decision_id=f"d-{vote.ref}")
                for vote in votes]

    async def ScoreVotes(self, request: fraud_scoring_service_pb2.ScoreVotesRequest,
                         context: Any) -> fraud_scoring_service_pb2.ScoreVotesResponse:
        return fraud_scoring_service_pb2.ScoreVotesResponse(scores=self._scores(request.votes))

    async def ScoreVoteStream(  # type: ignore[override]
            self, requests: Any, context: Any,
    ) -> AsyncIterator[fraud_scoring_service_pb2.ScoreVoteStreamResponse]:
        async for request in requests:
            yield fraud_scoring_service_pb2.ScoreVoteStreamResponse(
                batch=request.batch, scores=self._scores(request.votes))


async def test_fraud_verdicts_block_review_or_fail_open(stack: Stack) -> None:
    def decide(vote: fraud_scoring_service_pb2.VoteFacts) -> int:
        if vote.user_id.startswith("crook"):
            return fraud_types_pb2.FRAUD_ACTION_BLOCK
        if vote.user_id.startswith("doubtful"):
            return fraud_types_pb2.FRAUD_ACTION_REVIEW
        return fraud_types_pb2.FRAUD_ACTION_ALLOW
    scorer = _Scorer(decide)
    server = grpc.aio.server()
    fraud_scoring_service_pb2_grpc.add_FraudScoringServiceServicer_to_server(scorer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    replica = await start_replica(stack.database_url, stack.redis_url, "fraud",
                                  fraud_target=f"ipv4:127.0.0.1:{port}")
    test_round = await _round(stack)
    try:
        code, reason, _ = await refusal(replica.votes.SubmitVote(
            vote_request(test_round), metadata=inside(Role.VOTER, "crook-1"), timeout=10))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "FRAUD_BLOCKED")
        await asyncio.gather(*(replica.votes.SubmitVote(
            vote_request(test_round), metadata=inside(Role.VOTER, f"{who}-{i}"), timeout=10)
            for i in range(20) for who in ("doubtful", "honest")))
        assert max(scorer.calls) > 1  # batched: several votes per batch
        await server.stop(0)  # scoring goes away: votes are admitted unscored
        await replica.votes.SubmitVote(vote_request(test_round),
                                       metadata=inside(Role.VOTER, "crook-2"), timeout=10)
    finally:
        await stop_replica(replica)
        await server.stop(0)
    rows = await ledger_rows(stack.database_url, test_round.round_id)
    actions = Counter((row["user_id"].split("-")[0], row["fraud_action"]) for row in rows)
    assert actions == Counter({("doubtful", "REVIEW"): 20, ("honest", "ALLOW"): 20,
                               ("crook", "UNSCORED"): 1})
    closed = await start_replica(stack.database_url, stack.redis_url, "closed",
                                 fraud_target=f"ipv4:127.0.0.1:{port}",
                                 vote_fraud_fail_open=False)
    try:
        code, reason, _ = await refusal(closed.votes.SubmitVote(
            vote_request(test_round), metadata=inside(Role.VOTER, "honest-x"), timeout=10))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
    finally:
        await stop_replica(closed)
    assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 41


async def test_rate_limited_says_when_to_retry(stack: Stack, replicas: list[Replica]) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    test_round = await _round(stack, rate_limit=3)
    user = f"hasty-{new_id()[:8]}"
    await early_in_a_minute()
    await replicas[0].votes.SubmitVote(vote_request(test_round, count=3),
                                       metadata=inside(Role.VOTER, user), timeout=10)
    try:
        await replicas[1].votes.SubmitVote(vote_request(test_round),
                                           metadata=inside(Role.VOTER, user), timeout=10)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    else:
        raise AssertionError("the fourth vote in a minute was accepted")
    assert status is not None
    delays = []
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delays.append(info.retry_delay.ToMilliseconds())
    assert len(delays) == 1 and 0 < delays[0] <= 60_000
    assert len(await ledger_rows(stack.database_url, test_round.round_id)) == 1
